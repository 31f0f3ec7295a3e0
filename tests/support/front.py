"""The proxy port's own HTTP server with a handler of a test's choosing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.http.errors import HttpError
from gateway.http.lingering import LINGER, LingerBounds
from gateway.http.request import Request
from gateway.http.server import Handler, HttpServer
from gateway.http.wire import encode_header_block
from gateway.pipeline import answer_request_error
from gateway.problems import GatewayProblem, problem_from_http_error, render_problem


@asynccontextmanager
async def http_server(
    handler: Handler,
    *,
    head_timeout: float = 10.0,
    keepalive_timeout: float = 30.0,
    send_timeout: float = 30.0,
    linger: LingerBounds = LINGER,
) -> AsyncIterator[tuple[HttpServer, int]]:
    """Serve `handler` on a free loopback port, the server's own request errors answered as
    the gateway answers them; yields the server and its port."""
    server = HttpServer(
        handler,
        on_request_error=answer_request_error,
        head_timeout=head_timeout,
        keepalive_timeout=keepalive_timeout,
        send_timeout=lambda: send_timeout,
        linger=linger,
    )
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    try:
        yield server, listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        await server.shutdown(0.5)


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[int]:
    """`http_server` with the default timeouts; yields the port."""
    async with http_server(handler) as (_, port):
        yield port


def as_problem(error: GatewayProblem | HttpError) -> GatewayProblem:
    """What the gateway answers for `error` (the HTTP layer's errors mapped as it maps them)."""
    return error if isinstance(error, GatewayProblem) else problem_from_http_error(error, "soccer")


def answer_problem(request: Request, error: GatewayProblem | HttpError, request_id: str) -> None:
    problem = as_problem(error)
    headers, body = render_problem(problem, request_id)
    request.connection.respond(
        request,
        problem.status,
        problem.title,
        encode_header_block(headers),
        body,
        close=problem.close_connection,
    )
