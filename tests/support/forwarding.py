"""A real upstream and a real front server around `UpstreamPool.forward`, for the proxy's tests
(tests/integration/proxy): the front forwards every request it gets to the upstream."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import http.client
import struct
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from yarl import URL

from gateway.config.model import AuthConfig, Product, Upstream
from gateway.http.errors import HttpError
from gateway.http.headers import extra_headers, request_drop_set
from gateway.http.request import Request
from gateway.problems import GatewayProblem
from gateway.proxy import ForwardResult, UpstreamPool, forward
from tests.support.apps import serving_app
from tests.support.front import answer_problem, as_problem, serving

REQUEST_ID = "req-0001"
EXTRA_HEADERS = {"X-Request-ID": REQUEST_ID, "X-RateLimit-Limit": "10"}
MB = 1024 * 1024


# --------------------------------------------------------------------------- upstream


@dataclass
class UpstreamState:
    port: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


STATE = web.AppKey("state", UpstreamState)


async def upstream_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    path = request.path.removeprefix("/base")
    if path.startswith("/status/"):
        status = int(path.rsplit("/", 1)[1])
        headers = {"ETag": '"v1"', "X-Upstream": "yes"}
        if status == 304:
            return web.Response(status=304, headers=headers)
        return web.Response(
            status=status, reason="Custom Reason", body=f"body-{status}", headers=headers
        )
    if path == "/upload":
        digest, size = hashlib.sha256(), 0
        try:
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
        except BaseException:
            state.cancelled.set()
            raise
        return web.json_response(
            {
                "size": size,
                "sha256": digest.hexdigest(),
                "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            }
        )
    if path == "/download":
        total = int(request.query["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = total
        await response.prepare(request)
        try:
            for chunk in pattern(total):
                await response.write(chunk)
        except BaseException:
            state.cancelled.set()
            raise
        await response.write_eof()
        return response
    if path == "/slow":
        try:
            await asyncio.sleep(float(request.query["for"]))
        except asyncio.CancelledError:
            state.cancelled.set()
            raise
        return web.Response(text="late")
    if path == "/drip":
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(100):
                await response.write(b"drip\n")
                await asyncio.sleep(0.05)
        except BaseException:
            state.cancelled.set()
            raise
        return response
    if path == "/cookies":
        response = web.Response(text="cookies")
        for name, value in (
            ("Set-Cookie", "a=1; Path=/"),
            ("Set-Cookie", "b=2; Path=/"),
            ("Cache-Control", "no-cache"),
            ("Cache-Control", "private"),
            ("Connection", "X-Hop"),
            ("X-Hop", "drop me"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("X-Request-ID", "upstream-id"),
        ):
            response.headers.add(name, value)
        return response
    # Anything else echoes what arrived.
    body = await request.read()
    peer = request.transport.get_extra_info("peername") if request.transport else None
    state.seen.append({"raw_path": request.raw_path, "headers": request.raw_headers})
    return web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            "body": body.decode(),
            "body_exists": request.body_exists,
            "peer_port": peer[1] if peer else None,
        }
    )


@asynccontextmanager
async def running_echo_upstream() -> AsyncIterator[UpstreamState]:
    """An upstream under /base that echoes what arrived, except on the paths of
    `upstream_handler` that answer with a status, stream, stall or set headers."""
    state = UpstreamState()
    app = web.Application()
    app[STATE] = state
    app.router.add_route("*", "/{tail:.*}", upstream_handler)
    async with serving_app(app) as state.port:
        yield state


# ----------------------------------------------------------------------------- front


@dataclass
class Front:
    url: URL
    pool: UpstreamPool
    product: Product
    body_timeout: float = 5.0
    outcomes: list[ForwardResult | BaseException] = field(default_factory=list)

    def use(self, port: int, **upstream: Any) -> None:
        changed = dataclasses.replace(self.product.upstream, port=port, **upstream)
        self.product = dataclasses.replace(self.product, upstream=changed)

    async def outcome(self) -> ForwardResult | BaseException:
        for _ in range(200):
            if self.outcomes:
                return self.outcomes[-1]
            await asyncio.sleep(0.01)
        raise AssertionError("the front handler never finished")


def product_at(port: int) -> Product:
    upstream = Upstream(
        url=f"http://127.0.0.1:{port}/base",
        scheme="http",
        host="127.0.0.1",
        port=port,
        base_path="/base",
        connect_timeout=1.0,
        timeout=2.0,
    )
    return Product(name="soccer", upstream=upstream, routes=())


@asynccontextmanager
async def running_front(upstream_port: int) -> AsyncIterator[Front]:
    pool = UpstreamPool()
    auth = AuthConfig(header="X-API-Key", query_param="api_key")
    drop = request_drop_set(auth.header)
    front: Front | None = None

    async def handle(request: Request) -> None:
        assert front is not None
        try:
            result = await forward(
                request,
                pool.destination(front.product),
                drop,
                auth.query_param,
                REQUEST_ID,
                front.body_timeout,
                extra_headers(EXTRA_HEADERS),
            )
        except (GatewayProblem, HttpError) as error:
            problem = as_problem(error)
            front.outcomes.append(problem)
            answer_problem(request, problem, REQUEST_ID)
            return
        except BaseException as exc:
            front.outcomes.append(exc)
            raise
        front.outcomes.append(result)

    try:
        async with serving(handle) as port:
            front = Front(URL(f"http://127.0.0.1:{port}"), pool, product_at(upstream_port))
            yield front
    finally:
        await pool.close()


def raw_lines(headers: Any) -> list[tuple[str, str]]:
    return [(name.decode(), value.decode()) for name, value in headers]


def named(lines: list[tuple[str, str]] | list[list[str]], name: str) -> list[str]:
    return [value for key, value in lines if key.lower() == name.lower()]


def pattern(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """`total` bytes of a non-repeating-looking pattern, generated chunk by chunk."""
    block = hashlib.sha256(b"seed").digest() * (2 * chunk // 32)
    sent, index = 0, 0
    while sent < total:
        size = min(chunk, total - sent)
        offset = (index * 7919) % chunk
        part = struct.pack(">Q", index) + block[offset : offset + size - 8]
        yield part[:size]
        sent += size
        index += 1


def statuses_on_one_connection(
    port: int, method: str, body: bytes, pauses: list[float]
) -> list[int]:
    """Python's http.client sending the same request on one connection, at once and then
    `pause` seconds after each answer: the statuses. Blocking: run it in a thread."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    statuses = []
    try:
        for pause in [0.0, *pauses]:
            time.sleep(pause)
            connection.request(method, "/x", body=body)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    return statuses
