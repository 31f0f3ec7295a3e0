"""The proxy port's own server (http_server.py) with a handler of a test's choosing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.http.request import Request
from gateway.http.server import Handler, HttpServer
from gateway.http.wire import encode_header_block
from gateway.problems import PROBLEM_CONTENT_TYPE, GatewayProblem


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """Serve `handler` on a free loopback port; yields the port."""
    server = HttpServer(handler, head_timeout=10.0, keepalive_timeout=30.0)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await server.shutdown(1.0)


def answer_problem(request: Request, problem: GatewayProblem, request_id: str) -> None:
    block = encode_header_block({**problem.headers, "Content-Type": PROBLEM_CONTENT_TYPE})
    request.connection.respond(
        request,
        problem.status,
        problem.title,
        block,
        problem.body(request_id),
        close=problem.close_connection,
    )
