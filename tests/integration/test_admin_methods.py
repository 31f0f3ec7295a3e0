"""Methods on the admin port (a real gateway worker, raw HTTP): one a path does not take is a
405 with the path's `Allow`, one on a path not served a 404, one the HTTP parser does not know
(`FOO`) a 400, and `CONNECT` a 404 naming its target; each a problem+json."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.server import Worker
from tests.support.admin_port import SHOP_WITH_QUOTA, TOKEN, head
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.raw_http import connected

PROBLEM = "application/problem+json"
AUTH = f"Authorization: Bearer {TOKEN}"
WITHIN = 10  # seconds: loose, for a busy CI box


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[Worker]:
    config = write_config(tmp_path / "config", SHOP_WITH_QUOTA, server=worker_server_yaml())
    async with running_gateway(config, env={"GATEWAY_ADMIN_TOKEN": TOKEN}) as running:
        yield running


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def problem(self) -> dict[str, object]:
        assert self.headers["content-type"] == PROBLEM, self
        found = json.loads(self.body)
        assert isinstance(found, dict)
        assert found["request_id"] == self.headers["x-request-id"]
        return found


async def read_answer(reader: asyncio.StreamReader, *, to_head: bool = False) -> Answer:
    """One answer with a `Content-Length` (every answer asked for here has one); `to_head`:
    the answer to a HEAD, which has no body."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WITHIN)
    status_line, *lines = raw.decode("latin-1").split("\r\n")[:-2]
    headers = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines)}
    length = 0 if to_head else int(headers["content-length"])
    body = await asyncio.wait_for(reader.readexactly(length), WITHIN)
    return Answer(int(status_line.split()[1]), headers, body)


async def ends_here(reader: asyncio.StreamReader) -> bool:
    """Whether the server ends the connection with nothing more to say."""
    return await asyncio.wait_for(reader.read(), WITHIN) == b""


# Methods aiohttp's parser knows, on paths that do not take them (with the token: past 401).
NOT_TAKEN = [
    ("OPTIONS", "/admin/keys", "GET, HEAD, POST"),
    ("PUT", "/admin/keys/acme", "DELETE, GET, HEAD, PATCH"),
    ("PROPFIND", "/healthz", "GET, HEAD"),
    ("TRACE", "/admin/usage/acme", "GET, HEAD"),
    ("PATCH", "/admin/usage/acme/shop", "DELETE"),
    ("HEAD", "/admin/usage.csv", "GET"),
]


async def test_a_method_a_path_does_not_take_is_405_with_allow_and_none_is_404(
    worker: Worker,
) -> None:
    """As it was: kept while aiohttp's own answers changed (below)."""
    for method, path, allow in NOT_TAKEN:
        async with connected(worker.admin_port) as (reader, writer):
            writer.write(head(method, path, AUTH))
            answer = await read_answer(reader, to_head=method == "HEAD")
            assert (answer.status, answer.headers["allow"]) == (405, allow), (method, path)
            assert answer.headers["content-type"] == PROBLEM
            if method != "HEAD":
                assert answer.problem()["code"] == "method_not_allowed"
            writer.write(head("GET", "/healthz"))  # the connection goes on
            assert (await read_answer(reader)).status == 200, (method, path)
    for method, path in (("PURGE", "/admin/nothing"), ("DELETE", "/nothing")):
        async with connected(worker.admin_port) as (reader, writer):
            writer.write(head(method, path, AUTH))
            answer = await read_answer(reader)
        assert answer.status == 404, (method, path)
        assert answer.problem()["detail"] == f"Nothing is served at {path} on this port."


# Requests aiohttp's parser refuses before any path is read: a method it does not know
# (lower case, or not a token at all); and a bad byte in a header holding the admin token.
UNKNOWN_METHOD = "The request is not valid HTTP: its method is not one this port knows."
NOT_PARSED = [
    pytest.param(head("FOO", "/admin/keys", AUTH), UNKNOWN_METHOD, id="FOO-admin"),
    pytest.param(head("FOO", "/nothing"), UNKNOWN_METHOD, id="FOO-unknown-path"),
    pytest.param(head("get", "/healthz"), UNKNOWN_METHOD, id="lower-case"),
    pytest.param(head("GE(T", "/healthz"), UNKNOWN_METHOD, id="not-a-token"),
    pytest.param(
        head("GET", "/admin/keys", AUTH + "\x01"),
        "The request is not valid HTTP: its head cannot be read.",
        id="bad-header-byte",
    ),
]


@pytest.mark.parametrize("first", [b"", head("GET", "/healthz")], ids=["first", "second"])
@pytest.mark.parametrize(("request_bytes", "detail"), NOT_PARSED)
async def test_a_request_the_parser_refuses_is_a_problem_400(
    worker: Worker, first: bytes, request_bytes: bytes, detail: str
) -> None:
    """aiohttp answered these itself in plain text, quoting the refused line (the token too),
    past the middleware that makes every other admin answer a problem; first on a connection
    or after an answered request, which aiohttp logs otherwise."""
    async with connected(worker.admin_port) as (reader, writer):
        if first:
            writer.write(first)
            assert (await read_answer(reader)).status == 200
        writer.write(request_bytes)
        answer = await read_answer(reader)
        assert await ends_here(reader)  # what follows cannot be read as a request either
    assert answer.status == 400
    problem = answer.problem()
    assert (problem["code"], problem["detail"]) == ("bad_request", detail)
    assert TOKEN.encode() not in answer.body


async def test_connect_is_404_naming_its_target_and_ends_the_connection(worker: Worker) -> None:
    """It named no target ("Nothing is served at  on this port."): aiohttp's path of an
    authority-form target is empty. And aiohttp reads no body for CONNECT: the one sent here
    was read as the connection's next request, and answered."""
    smuggled = head("GET", "/healthz")
    connect = head("CONNECT", "host:443", f"Content-Length: {len(smuggled)}") + smuggled
    async with connected(worker.admin_port) as (reader, writer):
        writer.write(connect)
        answer = await read_answer(reader)
        assert await ends_here(reader)
    assert answer.status == 404
    problem = answer.problem()
    assert problem["code"] == "not_found"
    assert problem["detail"] == "Nothing is served at host:443 on this port: it opens no tunnels."
    assert answer.headers["connection"] == "close"


async def test_answers_to_requests_pipelined_before_a_refused_one_are_given_first(
    worker: Worker,
) -> None:
    """Requests sent in one write with one the parser refuses after them: aiohttp's parser
    dropped those it had read when it met the refused one, so the client had the 400 alone and
    never learnt whether its credit (a POST) was made."""
    credit_body = b'{"amount": 5}'
    credit = head(
        "POST", "/admin/usage/acme/shop/credit", AUTH, f"Content-Length: {len(credit_body)}"
    )
    pipelined = (
        head("GET", "/admin/keys", AUTH)
        + credit
        + credit_body
        + head("GET", "/healthz")
        + b"FOO / HTTP/1.1\r\n\r\n"
    )
    async with connected(worker.admin_port) as (reader, writer):
        writer.write(pipelined)
        keys = await read_answer(reader)
        credited = await read_answer(reader)
        health = await read_answer(reader)
        refused = await read_answer(reader)
        assert await ends_here(reader)
    assert keys.status == 200 and b'"acme"' in keys.body, keys
    assert credited.status == 200 and b'"credit": 5,' in credited.body, credited
    assert health.status == 200, health
    assert refused.status == 400
    assert refused.problem()["detail"] == UNKNOWN_METHOD
