"""The proxy port's own HTTP/1.1 server inside a whole gateway Worker, for the two things
only its pipeline decides: a HEAD without a key gets the 401's head and no body, and a
redirect has the standard reason phrase.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.raw_http import (
    connected,
    get,
    problem,
    read_reply,
)

API = """
products:
  soccer:
    upstream: {url: "http://127.0.0.1:9/base"}
    routes:
      - path: /soccer/v5/{rest:path}
      - path: /soccer/latest/{rest:path}
        redirect: {to: "/soccer/v4/{rest}", permanent: false}
      - path: /soccer/old/{rest:path}
        redirect: {to: "/soccer/v4/{rest}", permanent: true}
plans: {open: {}}
keys: [{name: tester, key: secret-1, plans: {soccer: open}}]
"""


@pytest.fixture
async def gateway_port(tmp_path: Path) -> AsyncIterator[int]:
    async with running_gateway(
        write_config(tmp_path / "config", API, server=worker_server_yaml())
    ) as worker:
        yield worker.proxy_port


async def test_gateway_head_without_key_gets_401_headers_without_body(gateway_port: int) -> None:
    async with connected(gateway_port) as (reader, writer):
        writer.write(b"HEAD /soccer/v5/x HTTP/1.1\r\nHost: t\r\n\r\n" + get("/soccer/v5/x"))
        head = await read_reply(reader, head_only=True)
        assert (head.status, head.reason) == (401, "Unauthorized")
        assert head.headers["content-type"] == "application/problem+json"
        # The GET's answer follows the HEAD's head at once: no body bytes came in between.
        following = await read_reply(reader)
        assert problem(following)["code"] == "unauthorized"
        # The HEAD's length is the one a GET's body has.
        assert int(head.headers["content-length"]) == len(following.body)


@pytest.mark.parametrize(
    ("prefix", "status", "reason"), [("latest", 302, "Found"), ("old", 301, "Moved Permanently")]
)
async def test_gateway_redirect_has_the_standard_reason_phrase(
    gateway_port: int, prefix: str, status: int, reason: str
) -> None:
    async with connected(gateway_port) as (reader, writer):
        writer.write(get(f"/soccer/{prefix}/en/x.json?limit=3"))
        reply = await read_reply(reader)
        assert (reply.status, reply.reason) == (status, reason)
        assert reply.headers["location"] == "/soccer/v4/en/x.json?limit=3"
