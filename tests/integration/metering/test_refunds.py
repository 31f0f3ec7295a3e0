"""Refunds, end to end: real requests through a gateway to a real upstream, the usage API on
its admin port, for memory, a real redis-server and a real Redis Cluster (the rig fixture).
Failures are given back under refund_on and counted without it, the rate never is, and a
client gone while its check waited on Redis is settled.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.metering_rig import Rig


async def test_slow_5xx_never_overrun_the_quota_and_are_all_given_back(rig: Rig) -> None:
    path = "/soccer/slow?for=0.2&status=500"
    for wave in (20, 8):
        rig.upstream.most_slow_in_flight = 0
        answers = await asyncio.gather(*(rig.get("refund", path) for _ in range(wave)))
        statuses = [status for status, _, _ in answers]
        # Five units, all taken at admission: never more than five requests in flight. (A
        # request that a busy machine sends after the first refunds landed may be admitted
        # too, never more than five at a time.)
        assert rig.upstream.most_slow_in_flight == 5
        # (500 from the upstream; 504 should a busy machine make it slower than its timeout)
        failed = statuses.count(500) + statuses.count(504)
        assert failed >= 5
        assert failed + statuses.count(429) == wave
        refused = {body["code"] for status, _, body in answers if status == 429}
        assert refused <= {"quota_exceeded"}
        # ...and every unit came back, so the next wave has five again.
        await rig.used_becomes("refund", 0)
    samples = await rig.metrics()
    labels = frozenset({("product", "soccer"), ("plan", "refunding"), ("result", "ok")})
    assert samples[("gateway_quota_refunds_total", labels)] >= 10


async def test_without_refund_on_failures_count(rig: Rig) -> None:
    for _ in range(2):
        status, _, _ = await rig.get("count", "/soccer/status/500")
        assert status == 500
    await asyncio.sleep(0.05)
    assert await rig.used("count") == 2


async def test_a_504_and_a_499_are_given_back(rig: Rig) -> None:
    status, headers, body = await rig.get("refund", "/soccer/slow?for=2")  # timeout: 300ms
    assert (status, body["code"]) == (504, "gateway_timeout")
    assert headers["X-Quota-Remaining"] == "4"
    await rig.used_becomes("refund", 0)

    # The client goes away while the upstream is still thinking. (The first slow request set
    # the event already: this one must be seen arriving on its own.)
    rig.upstream.started_slow.clear()
    _, writer = await asyncio.open_connection("127.0.0.1", rig.worker.proxy_port)
    try:
        key = f"refund-{rig.run}"
        writer.write(
            f"GET /soccer/slow?for=0.25 HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n\r\n".encode()
        )
        await writer.drain()
        await asyncio.wait_for(rig.upstream.started_slow.wait(), 5)
        assert await rig.used("refund") == 1
    finally:
        writer.transport.abort()
    await rig.used_becomes("refund", 0)
    # A 4xx of the upstream's is an answer: it counts. So does an upstream's own 499: the
    # client has it whole (only the gateway's record of a client that left is given back).
    assert (await rig.get("refund", "/soccer/status/404"))[0] == 404
    assert (await rig.get("refund", "/soccer/status/499"))[0] == 499
    await asyncio.sleep(0.05)
    assert await rig.used("refund") == 2


async def test_a_5xx_whose_client_left_during_its_body_is_given_back_under_5xx(rig: Rig) -> None:
    """An answer cut short after its head was sent counts by the status it began with: the
    upstream failed (503), and its client, told so by the head, left before the body was all
    there. Under refund_on: [5xx] the units stayed taken: the request was a 499 to the
    refund, and 499 is not listed."""
    head = await rig.leave_during_the_body("bill", "/soccer/big?status=503&bytes=50000000")
    assert head.startswith(b"HTTP/1.1 503 ")
    await rig.used_becomes("bill", 0)
    # A 200 cut by its client is a 499 and no 5xx: it counts under refund_on: [5xx].
    head = await rig.leave_during_the_body("bill", "/soccer/big?bytes=50000000")
    assert head.startswith(b"HTTP/1.1 200 ")
    await asyncio.sleep(0.2)
    assert await rig.used("bill") == 1


async def test_the_rate_is_not_given_back(rig: Rig) -> None:
    assert [(await rig.get("rated", "/soccer/status/500"))[0] for _ in range(2)] == [500, 500]
    status, _, body = await rig.get("rated", "/soccer/status/200")
    assert (status, body["code"]) == (429, "throttled")
    await rig.used_becomes("rated", 0)


# Keeps a Redis busy for ARGV[1] microseconds of its own clock: what a slow command does to
# the calls queued behind it.
_SPIN = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat
    t = redis.call('TIME')
until t[1] * 1000000 + t[2] - start > tonumber(ARGV[1])
"""


async def test_a_client_gone_while_its_check_waits_on_redis_is_settled(
    rig: Rig, request: pytest.FixtureRequest
) -> None:
    """Redis is busy; a client sends a request and leaves while its check waits in Redis's
    queue, well within the storage timeout. Redis then runs the check and takes the units: it
    was charged and never given back, and no metric counted the admission."""
    url = rig.worker.config.storage.url
    if url.startswith("memory://"):
        pytest.skip("the memory storage decides at once: no check is ever on its way")
    if url.startswith("redis+cluster://"):
        nodes = request.getfixturevalue("redis_cluster").nodes
    else:
        nodes = [request.getfixturevalue("redis_server")]
    await rig.get("refund", "/soccer/warm-up")  # the connections and the script are ready
    await rig.used_becomes("refund", 1)
    before = await rig.metrics()
    clients = [node.client() for node in nodes]
    try:
        busy = [asyncio.to_thread(client.eval, _SPIN, 0, 400_000) for client in clients]
        spinning = asyncio.gather(*busy)
        await asyncio.sleep(0.1)  # the scripts have begun
        _, writer = await asyncio.open_connection("127.0.0.1", rig.worker.proxy_port)
        key = f"refund-{rig.run}"
        writer.write(f"GET /soccer/gone HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.1)  # the check is in Redis's queue
        writer.transport.abort()
        await spinning
    finally:
        for client in clients:
            client.close()
    await rig.used_becomes("refund", 1)  # taken when Redis ran the check, then given back
    labels = frozenset({("product", "soccer"), ("plan", "refunding")})

    def grew(name: str, extra: tuple[str, str]) -> float:
        sample = (name, labels | {extra})
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    after = await rig.metrics()
    deadline = time.monotonic() + 5
    while grew("gateway_quota_refunds_total", ("result", "ok")) < 1:
        assert time.monotonic() < deadline, "the refund was never counted"
        await asyncio.sleep(0.02)
        after = await rig.metrics()
    assert grew("gateway_limit_decisions_total", ("decision", "allowed")) == 1
    assert grew("gateway_quota_refunds_total", ("result", "ok")) == 1
    assert (
        after[("gateway_quota_units_total", labels)] - before[("gateway_quota_units_total", labels)]
        == 1
    )
