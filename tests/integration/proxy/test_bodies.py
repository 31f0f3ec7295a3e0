"""Request and answer bodies through `UpstreamPool.forward`: streamed both ways without
buffering, chunked or with a length as they came."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import aiohttp

from tests.support.forwarding import MB, Front, named, pattern


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@asynccontextmanager
async def _peak_rss() -> AsyncIterator[list[int]]:
    peak = [_rss()]

    async def sample() -> None:
        while True:
            peak.append(_rss())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(sample())
    try:
        yield peak
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def test_big_bodies_stream_both_ways_without_buffering(
    front: Front, client: aiohttp.ClientSession
) -> None:
    size = 50 * MB
    sent_digest = hashlib.sha256()

    async def upload() -> AsyncIterator[bytes]:
        for chunk in pattern(size):
            sent_digest.update(chunk)
            yield chunk

    before = _rss()
    async with _peak_rss() as samples:
        async with client.post(
            front.url / "upload", data=upload(), headers={"Content-Length": str(size)}
        ) as response:
            assert response.status == 200
            uploaded = await response.json()
        received_digest, received = hashlib.sha256(), 0
        async with client.get(front.url / "download", params={"size": size}) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(size)
            async for chunk in response.content.iter_any():
                received_digest.update(chunk)
                received += len(chunk)
    assert uploaded["size"] == size
    assert uploaded["sha256"] == sent_digest.hexdigest()
    # A body with a length keeps it: the upstream sees no chunked encoding.
    assert named(uploaded["headers"], "Content-Length") == [str(size)]
    assert named(uploaded["headers"], "Transfer-Encoding") == []
    assert received == size
    assert received_digest.hexdigest() == hashlib.sha256(b"".join(pattern(size))).hexdigest()
    growth = max(samples) - before
    assert growth < 20 * MB, f"RSS grew by {growth / MB:.1f} MB while streaming 50 MB"


async def test_chunked_upload_stays_chunked(front: Front, client: aiohttp.ClientSession) -> None:
    async def upload() -> AsyncIterator[bytes]:
        for chunk in pattern(MB):
            yield chunk

    async with client.post(front.url / "upload", data=upload()) as response:
        uploaded = await response.json()
    assert uploaded["size"] == MB
    assert uploaded["sha256"] == hashlib.sha256(b"".join(pattern(MB))).hexdigest()
    assert named(uploaded["headers"], "Transfer-Encoding") == ["chunked"]
    assert named(uploaded["headers"], "Content-Length") == []


async def test_small_body_and_method_pass_through(
    front: Front, client: aiohttp.ClientSession
) -> None:
    async with client.put(front.url / "echo", data=b"hello") as response:
        echoed = await response.json()
    assert (echoed["method"], echoed["body"]) == ("PUT", "hello")
    assert named(echoed["headers"], "Content-Length") == ["5"]
