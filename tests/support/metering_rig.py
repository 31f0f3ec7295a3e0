"""The metering tests' rig (tests/integration/metering/): an upstream and an in-process gateway
serving API, whose keys are unique per run, with a client of its proxy and admin ports.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.server import Worker
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.raw_upstream import raw_upstream
from tests.support.reporting_upstream import reporting_upstream
from tests.support.upstream import Upstream, running_upstream

API = """
products:
  soccer:
    upstream: {{url: "{upstream}/base", timeout: 300ms}}
    routes:
      - path: /soccer/heavy/{{rest:path}}
        cost: 10
      - path: /soccer/metered/{{rest:path}}
        cost: 10
        cost_header: X-Units-Used
      - path: /soccer/reported/{{rest:path}}
        cost_header: x-units-used
      - path: /soccer/{{rest:path}}
  weather:
    upstream: {{url: "{upstream}/base"}}
    routes:
      - path: /weather/{{rest:path}}
  stream:
    upstream: {{url: "{trailing}"}}
    routes:
      - path: /stream/usage/{{rest:path}}
        cost: 10
        cost_field: usage.total_tokens
      - path: /stream/messages/{{rest:path}}
        cost: 10
        cost_field: [message.usage.input_tokens, usage.output_tokens]
      - path: /stream/priced/{{rest:path}}
        cost: 10
        cost_field:
          - message.usage.input_tokens
          - {{field: usage.output_tokens, weight: 5}}
      - path: /stream/{{rest:path}}
        cost: 10
        cost_header: X-Units-Used
plans:
  refunding:
    quota: {{limit: 5, per: month, refund_on: [5xx, 499]}}
  counting:
    quota: {{limit: 5, per: month}}
  rated:
    rate: {{limit: 2, per: 10s}}
    quota: {{limit: 100, per: month, refund_on: [5xx]}}
  billing:
    quota: {{limit: 100, per: month, refund_on: [5xx]}}
  local:
    rate: {{limit: 5, per: 10s}}
  payg:
    rate: {{limit: 50, per: second}}
    refund_on: [5xx]
  trial:
    rate: {{limit: 1, per: second}}
    quota: {{limit: 1000, per: month}}
keys:
  - {{name: refund-{run}, key: refund-{run}, plans: {{soccer: refunding}}}}
  - {{name: count-{run}, key: count-{run}, plans: {{soccer: counting}}}}
  - {{name: rated-{run}, key: rated-{run}, plans: {{soccer: rated}}}}
  - name: bill-{run}
    key: bill-{run}
    plans: {{soccer: billing, weather: billing, stream: billing}}
  - {{name: local-{run}, key: local-{run}, plans: {{soccer: local}}}}
  - {{name: payg-{run}, key: payg-{run}, plans: {{soccer: payg}}}}
  - name: vip-{run}
    key: vip-{run}
    plans:
      soccer: {{plan: trial, rate: {{limit: 50, per: second}}, quota: {{limit: 3, per: day}}}}
"""


class Rig:
    def __init__(self, worker: Worker, upstream: Upstream, run: str, http: aiohttp.ClientSession):
        self.worker = worker
        self.upstream = upstream
        self.run = run
        self.http = http

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.worker.proxy_port}{path}"

    def admin(self, path: str) -> str:
        return f"http://127.0.0.1:{self.worker.admin_port}{path}"

    async def get(self, key: str, path: str) -> tuple[int, dict[str, str], Any]:
        async with self.http.get(self.url(path), headers={"X-API-Key": f"{key}-{self.run}"}) as r:
            body = await r.json(content_type=None)
            return r.status, dict(r.headers), body

    async def leave_during_the_body(self, key: str, path: str) -> bytes:
        """Ask for `path`'s long answer, read its head and some of its body, and leave: the
        head read."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.worker.proxy_port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}-{self.run}\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            await asyncio.wait_for(reader.readexactly(1000), 5)  # some of the body, not all
            return head
        finally:
            writer.transport.abort()

    async def used(self, key: str, product: str = "soccer") -> int:
        async with self.http.get(self.admin(f"/admin/usage/{key}-{self.run}")) as response:
            assert response.status == 200
            return int((await response.json())["products"][product]["quota"]["used"])

    async def used_becomes(self, key: str, expected: int, product: str = "soccer") -> None:
        """Refunds land just after the answer: wait (briefly) for them."""
        await eventually(lambda: self.used(key, product), expected)

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with self.http.get(self.admin("/metrics")) as response:
            text = await response.text()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


async def eventually(read: Callable[[], Awaitable[Any]], expected: Any) -> None:
    deadline = time.monotonic() + 5
    while (value := await read()) != expected:
        assert time.monotonic() < deadline, f"{value!r} never became {expected!r}"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def _running_rig(tmp_path: Path, **server: str) -> AsyncIterator[Rig]:
    """An upstream and an in-process gateway serving API with `server` settings."""
    run = uuid.uuid4().hex[:8]
    async with running_upstream() as upstream, raw_upstream(reporting_upstream) as trailing:
        config = write_config(
            tmp_path / "c",
            API.format(
                upstream=upstream.url, trailing=f"http://127.0.0.1:{trailing.port}", run=run
            ),
            server=worker_server_yaml(**server),
        )
        async with running_gateway(config) as worker, aiohttp.ClientSession() as http:
            yield Rig(worker, upstream, run, http)
