"""A real upstream HTTP server on a loopback port, recording what reached it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from tests.support.apps import serving_app


@dataclass
class SeenRequest:
    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    body_size: int
    raw_path: str = ""  # the path as it came, escapes and all


@dataclass
class Upstream:
    port: int
    seen: list[SeenRequest] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    started_slow: asyncio.Event = field(default_factory=asyncio.Event)
    # WebSockets: bytes of the messages the flood handler had handed to its transport, and
    # how each WebSocket ended (the close code the upstream saw).
    flood_sent: int = 0
    ws_closed: list[int | None] = field(default_factory=list)
    slow_in_flight: int = 0  # /slow requests being answered now
    most_slow_in_flight: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# What `/limit-headers` answers with: every limit header name the gateway sends.
UPSTREAM_LIMIT_HEADERS = {
    "X-RateLimit-Limit": "5000",
    "X-RateLimit-Remaining": "4999",
    "X-RateLimit-Reset": "3600",
    "X-Quota-Limit": "7",
    "X-Quota-Remaining": "6",
    "X-Quota-Reset": "60",
    "RateLimit-Policy": '"upstream";q=5000;w=3600',
    "RateLimit": '"upstream";r=4999;t=3600',
    "RateLimit-Limit": "5000",
    "RateLimit-Remaining": "4999",
    "RateLimit-Reset": "3600",
    "X-RateLimit-Used": "1",
}


async def _handle(request: web.Request) -> web.StreamResponse:
    upstream: Upstream = request.app[UPSTREAM]
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    upstream.seen.append(
        SeenRequest(
            request.method,
            request.path_qs,
            [(k.decode(), v.decode()) for k, v in request.raw_headers],
            size,
            request.raw_path,
        )
    )
    path = request.path
    if path.endswith("/slow"):
        # ?for=SECONDS (default 5), ?status=CODE (default 200)
        upstream.started_slow.set()
        upstream.slow_in_flight += 1
        upstream.most_slow_in_flight = max(upstream.most_slow_in_flight, upstream.slow_in_flight)
        try:
            await asyncio.sleep(float(request.query.get("for", "5")))
        except asyncio.CancelledError:
            upstream.cancelled.set()
            raise
        finally:
            upstream.slow_in_flight -= 1
        return web.json_response({"slow": True}, status=int(request.query.get("status", "200")))
    if "/status/" in path:
        status = int(path.rsplit("/", 1)[1])
        body = b"" if status in (204, 304) else json.dumps({"status": status}).encode()
        if not body:
            return web.Response(status=status)
        return web.Response(status=status, body=body, content_type="application/json")
    if path.endswith("/reports"):
        # An upstream that says what a call cost: one X-Units-Used line per ?cost=VALUE (none
        # without), ?status=CODE (default 200).
        lines = CIMultiDict(("X-Units-Used", value) for value in request.query.getall("cost", []))
        return web.json_response(
            {"reported": True}, status=int(request.query.get("status", "200")), headers=lines
        )
    if path.endswith("/limit-headers"):
        # An upstream with limits of its own, which describe the gateway's use of it.
        return web.json_response(
            {"limited": True}, headers={**UPSTREAM_LIMIT_HEADERS, "X-Upstream": "yes"}
        )
    if path.endswith("/big"):
        # ?bytes=N (default 10 MiB), ?status=CODE (default 200), ?cost=VALUE (X-Units-Used)
        total = int(request.query.get("bytes", str(10 * 1024 * 1024)))
        headers = {"Content-Type": "application/octet-stream"}
        if "cost" in request.query:
            headers["X-Units-Used"] = request.query["cost"]
        response = web.StreamResponse(
            status=int(request.query.get("status", "200")), headers=headers
        )
        response.content_length = total
        await response.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < total:
                part = chunk[: min(len(chunk), total - sent)]
                await response.write(part)
                sent += len(part)
            await response.write_eof()
        except ConnectionResetError:
            upstream.cancelled.set()  # the gateway hung up: its client went away
        return response
    return web.json_response(
        {"method": request.method, "path_qs": request.path_qs, "body_size": size},
        headers={"X-Upstream": "yes"},
    )


async def _websocket(request: web.Request) -> web.StreamResponse:
    """`/ws/echo`: every message back as it came (`close <code>` closes with that code);
    `/ws/flood?bytes=N`: N bytes in 1 MiB binary messages, sent as fast as the peer takes them;
    `/ws/refuse`: a plain 403 instead of the switch; `?cost=VALUE` puts X-Units-Used in the 101."""
    upstream: Upstream = request.app[UPSTREAM]
    upstream.seen.append(
        SeenRequest(
            request.method,
            request.path_qs,
            [(k.decode(), v.decode()) for k, v in request.raw_headers],
            0,
        )
    )
    if request.path.endswith("/refuse"):
        return web.json_response({"refused": True}, status=403)
    ws = web.WebSocketResponse(max_msg_size=8 * 1024 * 1024, protocols=("chat", "feed"))
    if "cost" in request.query:  # what the WebSocket costs, said in the 101
        ws.headers["X-Units-Used"] = request.query["cost"]
    await ws.prepare(request)
    try:
        await _websocket_talk(upstream, request, ws)
    finally:
        # Also when the handler is cancelled because the connection was lost.
        upstream.ws_closed.append(ws.close_code)
    return ws


async def _websocket_talk(
    upstream: Upstream, request: web.Request, ws: web.WebSocketResponse
) -> None:
    if request.path.endswith("/flood"):
        total = int(request.query.get("bytes", str(64 * 1024 * 1024)))
        message = b"f" * (1024 * 1024)
        while upstream.flood_sent < total and not ws.closed:
            await ws.send_bytes(message)
            upstream.flood_sent += len(message)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            if message.data.startswith("close "):
                await ws.close(code=int(message.data.split()[1]), message=b"as asked")
                break
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)


UPSTREAM = web.AppKey("upstream", Upstream)


@asynccontextmanager
async def running_upstream() -> AsyncIterator[Upstream]:
    app = web.Application()
    upstream = Upstream(port=0)
    app[UPSTREAM] = upstream
    app.router.add_get("/ws/{tail:.*}", _websocket)
    app.router.add_route("*", "/{tail:.*}", _handle)
    async with serving_app(app) as upstream.port:
        yield upstream
