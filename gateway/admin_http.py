"""The admin port's HTTP server: aiohttp's, with its own answers told as problems too.

A request aiohttp's parser refuses never reaches the admin app, its middleware included:
aiohttp answered it itself, in plain text quoting the refused bytes. Among them is every
method its parser (llhttp) does not know, `FOO` as well as `foo`: such a request has no path
to route, so its answer is a 400, not the 404 or 405 a known method gets. Here each is a 400
`bad_request` problem saying what is wrong, never quoting the bytes (an `Authorization` header
with a bad byte holds the admin token), with a request id and the connection closed as before.

Requests pipelined before one the parser refuses are answered first, in order, then the 400:
aiohttp's parser dropped them when it met the refused one in the same read
(`_OneRequestAtATime`).

A connection's last answer, given before its request's body has all come (a refusal of a call
waiting for its `100 Continue`, a 408), is followed by the connection's end (FIN) at once, as
on the proxy port: aiohttp sent it only after reading what was left of the body, up to 10 s.

aiohttp offers no setting for any of these: `RequestHandler.handle_error` makes the answer,
`RequestHandler.finish_response` ends each one, and the runner's server makes the connections
(`AdminRunner`, `_AdminServer`, `_AdminConnection`) and their parsers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from gateway.problems import BadRequest, GatewayProblem, InternalError, render_problem
from gateway.record import request_id_for

log = logging.getLogger("gateway.admin")

# What is wrong with a request aiohttp's parser refused, by its error, most specific first.
_NOT_HTTP: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (BadHttpMethod, "its method is not one this port knows"),
    (BadStatusLine, "its request line is malformed"),
    (InvalidURLError, "its target is malformed"),
    (LineTooLong, "a line of its head is too long"),
    (InvalidHeader, "a header is malformed"),
    (PayloadEncodingError, "its body's framing is broken"),
)


def _refusal(status: int, error: BaseException | None) -> GatewayProblem | None:
    """The problem for aiohttp's own answer with `status`; None for one it never gives."""
    if status == 400:
        what = next((said for kind, said in _NOT_HTTP if isinstance(error, kind)), None)
        detail = f"The request is not valid HTTP: {what or 'its head cannot be read'}."
        # The rest of what the client sent cannot be read either: the connection ends.
        return BadRequest(detail, close_connection=True)
    if status == 500:
        # A failure the middleware did not answer (it answers every other).
        return InternalError("The gateway failed to handle this call.")
    return None


class _AdminConnection(RequestHandler):
    """One admin connection; aiohttp's own answers on it are problems."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own first: it logs the error (ADMIN_HTTP_LOG's filter makes that one line)
        # and refuses to answer once an answer has begun. Its plain-text answer is replaced.
        plain = super().handle_error(request, status, exc, message)
        problem = _refusal(status, exc)
        if problem is None:
            return plain
        # The request was never read: no X-Request-ID of its own to give back.
        headers, body = render_problem(problem, request_id_for(None))
        answer = web.Response(status=problem.status, body=body, headers=headers)
        answer.force_close()  # as aiohttp's own answer did, whatever the problem
        return answer

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        answered, reset = await super().finish_response(request, resp, start_time)
        if not reset and not answered.keep_alive and not request.content.is_eof():
            # The connection's last answer, given before the body came (a 401 to a client
            # waiting for its `100 Continue`, a 413, a 408): aiohttp now reads and drops the
            # rest of the body, up to 10 s, so that a client still sending gets no reset, and
            # only then closes. A client sending nothing more would see the end only then:
            # the write side is shut now, as on the proxy port (FIN after the answer).
            transport = self.transport
            if transport is not None and transport.can_write_eof():
                transport.write_eof()
        return answered, reset


class _OneRequestAtATime(_AdminConnection):
    """An admin connection whose parser reads a request only once those before it are taken.

    aiohttp's parser reads all the requests that came in one read, pipelined, and hands them
    over together (up to 32); when one of them cannot be parsed, it raises, and the ones it had
    read are lost (kept inside it, where aiohttp cannot reach them): the client was answered the
    400 alone, not whether the calls before it were made. aiohttp's own bound on the requests
    read ahead, down to 1, makes the parser stop at the end of each request, the rest of the
    read kept for when that request is taken: a request that cannot be parsed is then met
    alone, once those before it are taken, and its 400 follows their answers.
    """

    __slots__ = ()

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        auto_decompress: bool = True,  # aiohttp's default
        **settings: Any,
    ) -> None:
        super().__init__(manager, loop=loop, auto_decompress=auto_decompress, **settings)
        # The parser as aiohttp makes it (RequestHandler.__init__), but for the bound.
        parser = self._parser
        if parser is None:
            raise AttributeError("the connection has no parser")
        one_at_a_time = type(parser)(
            self,
            loop,
            self._read_bufsize,
            max_line_size=self.max_line_size,
            max_field_size=self.max_field_size,
            max_headers=self.max_headers,
            payload_exception=RequestPayloadError,
            auto_decompress=auto_decompress,
            max_msg_queue_size=1,
        )
        # The connection's own bound, past which it pauses the socket, and the count it
        # resumes at (aiohttp's: 32, and 16).
        self._max_msg_queue_size = 1
        self._msg_queue_resume_size = 0
        self._parser = one_at_a_time

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._messages and not self._reading_paused:
            # aiohttp has the parser read on when a request queued is taken. But it stops at
            # the end of a request taken before its body had all come too, with nothing queued:
            # what came after that body (a pipelined request) would wait, unread, for more
            # bytes, which a client awaiting its answers never sends. It is read now.
            super().data_received(b"")


class _AdminServer(web.Server):
    """The admin app's server, making `_AdminConnection`s, or `_OneRequestAtATime`s once
    `admin_server` made one as a trial (a later aiohttp's connections might not take it, and
    no connection may fail to be made)."""

    connection_kind: type[_AdminConnection] = _AdminConnection

    def __call__(self) -> RequestHandler:
        return self.connection_kind(self, loop=self._loop, **self._kwargs)


class AdminRunner(web.AppRunner):
    """`web.AppRunner` for the admin app (`build_admin_app`), with the connections of
    `_AdminConnection`; takes what `web.AppRunner` takes."""

    __slots__ = ()

    async def _make_server(self) -> web.Server:
        # The server aiohttp makes for the app (its startup run, its handler, its request
        # factory, this runner's settings), remade as the admin port's kind.
        return admin_server(await super()._make_server())


def admin_server(made: web.Server) -> web.Server:
    """`made` remade as `_AdminServer`; `made` itself should aiohttp's server no longer have
    the (private) parts this reads: the admin port then serves as aiohttp made it, its refusals
    in plain text, rather than the gateway failing to start after an aiohttp upgrade. Likewise
    its connections read requests as aiohttp's do should `_OneRequestAtATime` fail."""
    try:
        remade = _AdminServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
        remade()  # a connection never connected: a failure found now, not at each connection
    except (AttributeError, TypeError) as exc:
        log.warning(
            "admin port: aiohttp %s's server is not as expected (%s): requests its parser "
            "refuses are answered in its own plain text, not as problems",
            aiohttp.__version__,
            exc,
        )
        return made
    try:
        _OneRequestAtATime(remade, loop=made._loop, **made._kwargs).data_received(b"")
    except (AttributeError, TypeError) as exc:
        log.warning(
            "admin port: aiohttp %s's connections are not as expected (%s): the answers to "
            "requests pipelined before one its parser refuses are lost",
            aiohttp.__version__,
            exc,
        )
    else:
        remade.connection_kind = _OneRequestAtATime
    return remade
