"""`Expect: 100-continue` on the admin port (a real gateway worker): the `100 Continue` goes
out only when a call reads its body, so a call refused before then (no token, a body over the
limit, a path or a method the port does not serve) never has its body sent, and is answered
with problem+json and `Connection: close`; any other expectation is ignored."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.server import Worker
from tests.support.admin_port import SHOP_WITH_QUOTA, TOKEN, head
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway

CREDIT = "/admin/usage/acme/shop/credit"
BODY = b'{"amount": 5}'


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[Worker]:
    config = write_config(tmp_path / "config", SHOP_WITH_QUOTA, server=worker_server_yaml())
    async with running_gateway(config, env={"GATEWAY_ADMIN_TOKEN": TOKEN}) as running:
        yield running


async def test_expect_on_the_admin_port_is_answered_as_on_the_proxy_port(worker: Worker) -> None:
    """`100-continue` gets its 100 before the body is sent; another expectation is ignored and
    the call answered as usual (aiohttp answered it with a plain-text 417, no problem+json)."""
    call = (f"Authorization: Bearer {TOKEN}", f"Content-Length: {len(BODY)}")
    reader, writer = await asyncio.open_connection("127.0.0.1", worker.admin_port)
    writer.write(head("POST", CREDIT, *call, "Expect: 100-continue"))
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(BODY)
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status.startswith(b"HTTP/1.1 200 "), status

    for expectation, credit in (("the-moon", 10), ("100-continue, the-moon", 15)):
        reader, writer = await asyncio.open_connection("127.0.0.1", worker.admin_port)
        writer.write(head("POST", CREDIT, *call, f"Expect: {expectation}") + BODY)
        answer = await asyncio.wait_for(reader.readuntil(b"}}}"), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert f'"credit": {credit},'.encode() in answer, answer


REFUSED_BEFORE_THE_BODY = [
    pytest.param("POST", CREDIT, (), 401, id="no token"),
    pytest.param("POST", CREDIT, ("Authorization: Bearer wrong",), 401, id="wrong token"),
    pytest.param("POST", "/admin/nothing", (), 401, id="unknown admin path, no token"),
    pytest.param("POST", "/nothing", (), 404, id="unknown path"),
    pytest.param("PUT", CREDIT, (f"Authorization: Bearer {TOKEN}",), 405, id="wrong method"),
]


@pytest.mark.parametrize(("method", "path", "lines", "status"), REFUSED_BEFORE_THE_BODY)
async def test_a_call_refused_before_its_body_never_invites_it(
    worker: Worker, method: str, path: str, lines: tuple[str, ...], status: int
) -> None:
    """The 100 went out before any check: a client without the token was asked for its body
    (a megabyte each), and one that got a 100 and then the 401 had sent it for nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", worker.admin_port)
    try:
        length = f"Content-Length: {len(BODY)}"
        writer.write(head(method, path, *lines, length, "Expect: 100-continue"))
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
        assert b"Content-Type: application/problem+json\r\n" in answer
        # The client may yet send the body, or its next request: no one could tell which.
        assert b"Connection: close\r\n" in answer
    finally:
        writer.close()


async def test_a_body_over_the_limit_is_refused_before_it_is_invited(worker: Worker) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", worker.admin_port)
    try:
        call = (f"Authorization: Bearer {TOKEN}", f"Content-Length: {100 * 1024 * 1024}")
        writer.write(head("POST", CREDIT, *call, "Expect: 100-continue"))
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        assert b"Connection: close\r\n" in answer
    finally:
        writer.close()


@pytest.mark.parametrize(("method", "path"), [("POST", "/nothing"), ("PUT", CREDIT)])
async def test_another_expectation_is_ignored_on_a_path_or_method_not_served(
    worker: Worker, method: str, path: str
) -> None:
    """aiohttp's router answered these with a plain-text 417 that no middleware saw."""
    reader, writer = await asyncio.open_connection("127.0.0.1", worker.admin_port)
    try:
        lines = (f"Authorization: Bearer {TOKEN}", "Content-Length: 0", "Expect: the-moon")
        writer.write(head(method, path, *lines))
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert answer.startswith(b"HTTP/1.1 404 " if method == "POST" else b"HTTP/1.1 405 ")
        assert b"Content-Type: application/problem+json\r\n" in answer, answer
    finally:
        writer.close()


async def test_a_call_refused_before_its_body_ends_its_connection_at_once(worker: Worker) -> None:
    """The refused client is not sending its body (it waits for a `100 Continue`): aiohttp
    waited up to 10 s for it before it closed the connection, so the client, told
    `Connection: close`, saw the connection's end only then. The end now follows the answer;
    a client that sends its body all the same has it read and dropped, and is sent no reset."""
    loop = asyncio.get_running_loop()
    with socket.create_connection(("127.0.0.1", worker.admin_port)) as client:
        client.setblocking(False)
        lines = ("Authorization: Bearer wrong", f"Content-Length: {len(BODY)}")
        await loop.sock_sendall(client, head("POST", CREDIT, *lines, "Expect: 100-continue"))
        received = b""
        while not _whole_answer(received):
            got = await asyncio.wait_for(loop.sock_recv(client, 65536), 10)
            assert got, received
            received += got
        assert received.startswith(b"HTTP/1.1 401 "), received
        assert b'"code": "unauthorized"' in received, received
        # Loose for a busy box, and short of aiohttp's 10 s wait by far.
        assert await asyncio.wait_for(loop.sock_recv(client, 65536), 5) == b""
        await loop.sock_sendall(client, BODY)
        await asyncio.sleep(0.2)  # for a reset, were one sent, to come back
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def _whole_answer(received: bytes) -> bool:
    """Whether `received` holds an answer's head and the body its `Content-Length` gives."""
    answer_head, found, body = received.partition(b"\r\n\r\n")
    if not found:
        return False
    length = answer_head.lower().split(b"content-length:")[1].split(b"\r\n")[0]
    return len(body) >= int(length)
