"""One client connection on the proxy port: aiohttp's protocol plus what a gateway adds.

aiohttp has no timer on a slow request head (a client trickling its headers would hold a
connection forever) and answers malformed requests in text/plain. This subclass adds the
`client_header` timer, answering 408 and closing, and makes every such answer problem+json.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway import accesslog, metrics
from gateway.problems import PROBLEM_CONTENT_TYPE, BadRequest, InternalError, RequestTimeout
from gateway.record import RequestRecord


class GatewayConnection(RequestHandler):
    __slots__ = ("_head_started", "_head_timeout", "_head_timer")

    def __init__(self, manager: web.Server, *, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = 0.0

    def data_received(self, data: bytes) -> None:
        heads_before = self._request_count
        super().data_received(data)
        if self._request_count != heads_before:
            self._stop_head_timer()
        elif (
            self._head_timer is None
            and not self._request_in_progress
            and not self._messages
            and not self._force_close
        ):
            # The first bytes of a request head: from now on the whole head must arrive in time.
            self._head_started = time.time()
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_timed_out)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or transport.is_closing() or self._request_in_progress:
            return
        problem = RequestTimeout("The request head did not arrive in time.")
        request_id = os.urandom(16).hex()
        body = problem.body(request_id)
        head = (
            f"HTTP/1.1 408 Request Timeout\r\nContent-Type: {PROBLEM_CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        transport.write(head + body)
        record = RequestRecord(request_id, "", "", self._head_started)
        record.status, record.code = problem.status, problem.code
        record.duration = time.time() - self._head_started
        record.bytes_sent = len(head) + len(body)
        metrics.observe_request(record)
        accesslog.write_access_log(record)
        self.force_close()
        transport.close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own errors (a request it cannot parse, mostly) as problem+json."""
        if isinstance(exc, ConnectionError):
            # The client went away mid-answer (already recorded as 499): nothing is left to
            # answer and nothing is wrong with the gateway, so no traceback in the log.
            # aiohttp takes a ConnectionError from here as a quiet end of the connection.
            raise ConnectionResetError("the client closed the connection") from exc
        if request.writer.output_size > 0:
            # Part of an answer is already out: all we can do is cut the connection.
            return super().handle_error(request, status, exc, message)
        problem = (
            BadRequest(f"The request is not valid HTTP: {message or 'malformed request'}")
            if status == 400
            else InternalError("The gateway failed to handle this request.")
        )
        if status != 400:
            self.log_exception("Error handling request", exc_info=exc)
        request_id = os.urandom(16).hex()
        response = web.Response(
            status=problem.status,
            body=problem.body(request_id),
            headers={"Content-Type": PROBLEM_CONTENT_TYPE, "X-Request-ID": request_id},
        )
        response.force_close()
        record = RequestRecord(request_id, "", "", time.time())
        record.status, record.code = problem.status, problem.code
        metrics.observe_request(record)
        accesslog.write_access_log(record)
        return response
