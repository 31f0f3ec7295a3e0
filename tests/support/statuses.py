"""The API the status tests run a gateway with (a route of each kind, an upstream that
refuses, an open and a rated plan), its keys, and the reads they make of its answers: a
problem+json body, or the raw answer to a head sent as bytes.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from gateway.server import Worker

API = """
products:
  soccer:
    upstream: {{url: "{upstream}/base", connect_timeout: 1s, timeout: 500ms}}
    routes:
      - path: /soccer/v4/{{lang}}/competitions/{{competition_id}}/info.json
        methods: [GET]
        params:
          lang: {{enum: [en, de, fr]}}
          competition_id: {{pattern: "sr:competition:[0-9]+"}}
        query:
          limit: {{type: int, min: 1, max: 100, required: false}}
      - path: /soccer/v5/{{rest:path}}
      - path: /soccer/v3/{{rest:path}}
        gone: {{sunset: "2026-01-01"}}
      - path: /soccer/retired
        gone: true
      - path: /soccer/latest/{{rest:path}}
        redirect: {{to: "/soccer/v4/{{rest}}", permanent: false}}
      - path: /soccer/old/{{rest:path}}
        redirect: {{to: "/soccer/v4/{{rest}}", permanent: true}}
      - path: /soccer/moved/{{rest:path}}
        redirect: {{to: "/soccer/v4/{{rest}}?from=moved"}}
  refused:
    upstream: {{url: "http://127.0.0.1:{closed_port}"}}
    routes: [{{path: "/refused/{{rest:path}}"}}]
plans:
  open: {{}}
  rated: {{rate: {{limit: 100, per: second}}}}
keys:
  - name: tester
    key: secret-1
    plans: {{soccer: open, refused: open}}
  - name: rated
    key: secret-rated
    plans: {{soccer: rated}}
"""


KEY = {"X-API-Key": "secret-1"}


RATED = {"X-API-Key": "secret-rated"}


def url(gateway: Worker, path: str) -> str:
    return f"http://127.0.0.1:{gateway.proxy_port}{path}"


async def problem_of(response: aiohttp.ClientResponse) -> dict[str, object]:
    assert response.headers["Content-Type"] == "application/problem+json"
    body = json.loads(await response.read())
    assert body["type"] == "about:blank"
    assert body["status"] == response.status
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body  # type: ignore[no-any-return]


INFO = "/soccer/v4/en/competitions/sr:competition:17/info.json"


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(-1), 3)


async def raw_answer(gateway: Worker, head: bytes) -> bytes:
    """The whole answer to a request head sent as these bytes (with `Connection: close`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    writer.write(head)
    raw = await read_all(reader)
    writer.close()
    return raw


async def raw_status(gateway: Worker, head: bytes) -> bytes:
    """The status code the gateway answers a request head sent as these bytes."""
    raw = await raw_answer(gateway, head)
    return raw.split(b"\r\n", 1)[0].split(b" ")[1]
