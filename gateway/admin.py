"""The admin port (README, "The admin port"): metrics, health, readiness and the usage API.

    GET    /metrics                            Prometheus text, all workers summed
    GET    /healthz                            200 while the process serves
    GET    /readyz                             200 when a config is loaded and the storage answers
    /admin/usage...                            the usage API (gateway.admin_usage)
    /admin/keys...                             the keys API (gateway.keys.api)

With a token, `/admin/*` requires `Authorization: Bearer <token>` (401 `unauthorized` otherwise);
the probes and /metrics never do, so orchestrators and Prometheus need no secret. Errors are
problem+json like the proxy's own; the admin API adds 404 "Not Found" `not_found` for an
unknown key or product, 400 "Bad Request" naming the field of a bad body or query, and 409
"Conflict" `conflict` and 412 "Precondition Failed" `precondition_failed` in the keys API.
What aiohttp answers itself (a request its parser refuses) is a problem too (gateway.admin_http).
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import time
import warnings
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.admin_json import ADMIN_ROUTE, BODY_TIMEOUT, AdminRouter, awaits_continue
from gateway.admin_state import (
    ADMIN_STATE,
    AdminState,
    Clock,
    ConfigGetter,
    within_storage_timeout,
)
from gateway.admin_usage import add_usage_routes
from gateway.keys.api import KeysAccess, add_key_routes
from gateway.limits.base import Limiter
from gateway.metrics import render_metrics
from gateway.problems import (
    REQUEST_ID_HEADER,
    ContentTooLarge,
    GatewayProblem,
    InternalError,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    render_problem,
)
from gateway.record import request_id_for

log = logging.getLogger(__name__)


class NotReady(ServiceUnavailable):
    code = "not_ready"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


def build_admin_app(
    get_config: ConfigGetter,
    limiter: Limiter,
    *,
    token: str | None,
    clock: Clock = time.time,
    keys: KeysAccess | None = None,
    draining: Callable[[], bool] = lambda: False,
) -> web.Application:
    """The admin application of one worker; `token` is GATEWAY_ADMIN_TOKEN (None: no auth);
    `keys` adds the keys API."""
    if token == "":
        # "Bearer " with nothing after it must not open the admin API.
        raise ValueError("the admin token must not be empty")
    with warnings.catch_warnings():
        # `router=` is deprecated for aiohttp 4 (the requirements keep it below 4), and the
        # one way to answer `Expect` on the router's own 404 and 405 (`AdminRouter`): aiohttp 3
        # offers no replacement for it (aiohttp issue 11840 asks for one), and a catch-all
        # route instead would have to redo the router's 405 and its `Allow`.
        warnings.simplefilter("ignore", DeprecationWarning)
        app = web.Application(
            router=AdminRouter(),
            middlewares=[_close_if_body_not_invited, _problems_and_auth],
            client_max_size=_MAX_BODY,
        )
    app.on_response_prepare.append(_tag_request_id)
    app[BODY_TIMEOUT] = lambda: get_config().server.timeouts.client_body
    app[ADMIN_STATE] = AdminState(
        get_config=get_config,
        limiter=limiter,
        token=token.encode() if token is not None else None,
        clock=clock,
        keys=keys,
        draining=draining,
    )
    app.router.add_get("/metrics", _metrics, **ADMIN_ROUTE)
    app.router.add_get("/healthz", _healthz, **ADMIN_ROUTE)
    app.router.add_get("/readyz", _readyz, **ADMIN_ROUTE)
    add_usage_routes(app)
    if keys is not None:
        add_key_routes(app, keys)
    return app


class _ClientFaults(logging.Filter):
    """aiohttp logs at ERROR, with a traceback, what is the client's doing:
    - a request it cannot parse, quoting the offending line (an `Authorization` header with a
      bad byte put the admin token in the log): one line at INFO, naming only its kind;
    - a client that left before its answer (a long export): one line at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "a client"
        if isinstance(error, HttpProcessingError):
            record.msg = "admin port: refused a request from %s that is not valid HTTP (%s)"
            level = logging.INFO
        elif isinstance(error, ConnectionError):
            # Only the client's leaving reaches aiohttp as one (the middleware answers others).
            record.msg = "admin port: %s left before its answer (%s)"
            level = logging.DEBUG
        else:
            return True
        level = min(level, record.levelno)  # never louder than aiohttp made it
        record.args = (remote, type(error).__name__)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = level, logging.getLevelName(level)
        # It passed the logger's level at the level aiohttp gave it: at its own, it must pass it
        # again (the handlers would show a DEBUG line on an INFO logger).
        return level >= logging.getLogger(record.name).getEffectiveLevel()


# aiohttp's server logger for the admin port (`AppRunner(..., logger=ADMIN_HTTP_LOG)`).
ADMIN_HTTP_LOG = logging.getLogger("gateway.admin.http")
ADMIN_HTTP_LOG.addFilter(_ClientFaults())

# The largest body an admin call may send: a key, a credit, a list of plans fit many times over.
_MAX_BODY = 1024 * 1024


@web.middleware
async def _close_if_body_not_invited(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An answer to a client still waiting for its `100 Continue` (a call refused before its
    body was read) says `Connection: close` (RFC 9110 10.1.1): the client may send the body
    yet, or its next request, and which of them comes next on this connection no one can
    tell."""
    response = await handler(request)
    if awaits_continue(request) and not request.content.is_eof() and not response.prepared:
        response.force_close()
    return response


@web.middleware
async def _problems_and_auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request_id = _request_id(request)
    try:
        if request.path == "/admin" or request.path.startswith("/admin/"):
            _authorize(request, request.app[ADMIN_STATE].token)
        length = request.content_length
        if length is not None and length > _MAX_BODY:
            # Refused whether or not the call reads a body: aiohttp's own check comes only as
            # a body is read, and a DELETE with 2 MB went through.
            raise web.HTTPRequestEntityTooLarge(max_size=_MAX_BODY, actual_size=length)
        return await handler(request)
    except GatewayProblem as problem:
        return _problem_response(problem, request_id)
    except web.HTTPNotFound as exc:
        _let_go(exc)
        return _problem_response(_nothing_at(request), request_id)
    except web.HTTPMethodNotAllowed as exc:
        _let_go(exc)
        allow = ", ".join(sorted(exc.allowed_methods))
        refused = MethodNotAllowed(
            f"{request.method} is not allowed here.", headers={"Allow": allow}
        )
        return _problem_response(refused, request_id)
    except web.HTTPRequestEntityTooLarge:
        too_large = ContentTooLarge(f"body: over the {_MAX_BODY} bytes an admin call may send")
        return _problem_response(too_large, request_id)
    except web.HTTPException:
        raise
    except Exception as exc:
        transport = request.transport
        if isinstance(exc, ConnectionError) and (transport is None or transport.is_closing()):
            raise  # the client left (a long export): nothing to answer (_ClientFaults logs it)
        if request.writer.output_size > 0:
            # An answer (an export) has begun: a problem now would land inside its body. Let
            # aiohttp log it and drop the connection, so the client sees the answer cut short.
            raise
        # A bug: told as a problem like every other answer, with its traceback in the log only.
        log.exception("admin API: failed to answer %s %s", request.method, request.path)
        failed = InternalError("The gateway failed to handle this call.")
        return _problem_response(failed, request_id)


def _nothing_at(request: web.Request) -> NotFound:
    """The router's 404, naming the target."""
    if request.method == "CONNECT":
        # Its target is a host and port, of which aiohttp's path keeps nothing; and a body it
        # has (aiohttp reads none for CONNECT) would be read as the connection's next request.
        return NotFound(
            f"Nothing is served at {request.raw_path} on this port: it opens no tunnels.",
            close_connection=True,
        )
    return NotFound(f"Nothing is served at {request.path} on this port.")


def _let_go(refusal: web.HTTPException) -> None:
    """The router's 404 or 405 is kept in the call's match info; raised, its traceback holds the
    frames that hold the call: a cycle for the collector alone, which a reload's gc.freeze kept
    for good (a call to an unknown path each second: thousands an hour). The traceback goes."""
    refusal.__traceback__ = None


def _authorize(request: web.Request, token: bytes | None) -> None:
    if token is None:
        return
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    # aiohttp decodes header bytes that are not UTF-8 as surrogates: encoded back as they came,
    # they compare (unequal) instead of raising.
    presented = credentials.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() == "bearer" and hmac.compare_digest(presented, token):
        return
    raise Unauthorized(
        "The admin API needs 'Authorization: Bearer <token>' with the admin token.",
        headers={"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
    )


def _problem_response(problem: GatewayProblem, request_id: str) -> web.Response:
    headers, body = render_problem(problem, request_id)
    response = web.Response(status=problem.status, body=body, headers=headers)
    if problem.close_connection:
        response.force_close()  # the rest of a stalled body may still come
    return response


# The id of the call being answered: set by the middleware in the call's own task (aiohttp
# runs each in one), read when its answer's head is sent, a streamed one's included.
_CALL_ID: contextvars.ContextVar[str] = contextvars.ContextVar("admin_call_id")


def _request_id(request: web.Request) -> str:
    """The call's X-Request-ID (the client's, if sane, else a new one), as on the proxy port:
    every answer carries it, a problem's body too."""
    request_id = request_id_for(request.headers.get(REQUEST_ID_HEADER))
    _CALL_ID.set(request_id)
    return request_id


async def _tag_request_id(request: web.Request, response: web.StreamResponse) -> None:
    found = _CALL_ID.get("")
    # Used up: an answer aiohttp makes itself later on the same connection (a request it
    # cannot parse never reaches the middleware) must not carry this call's id.
    _CALL_ID.set("")
    response.headers.setdefault(REQUEST_ID_HEADER, found or request_id_for(None))


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = render_metrics()
    # The content type carries parameters (version, charset) that `content_type=` would reject.
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    if state.draining():
        # The proxy port has stopped accepting: a load balancer should look elsewhere now,
        # not after its connections are refused.
        raise NotReady("The gateway is shutting down.")
    await within_storage_timeout(state, state.limiter.ping())
    if state.keys is not None and not state.keys.store.table.loaded:
        raise NotReady("The API keys are not loaded from the storage yet.")
    return web.json_response({"status": "ready"})
