"""The request path, one step per check of the contract's §3, in the order it promises.

Each step either lets the request go on (returns None), answers it (returns a response, as a
redirect does), or raises a GatewayProblem that `handle_request` turns into problem+json.
Nothing before `apply_limits` touches the limit storage, so nothing that fails earlier uses up
rate or quota.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from gateway import accesslog, metrics
from gateway.auth import Principal
from gateway.config.model import ApiKey
from gateway.limits.base import StorageError
from gateway.limits.headers import limit_headers
from gateway.params import check_path_params, check_query
from gateway.problems import (
    CLIENT_CLOSED_CODE,
    CLIENT_CLOSED_STATUS,
    PROBLEM_CONTENT_TYPE,
    GatewayProblem,
    Gone,
    InternalError,
    Maintenance,
    QuotaExceeded,
    StorageUnavailable,
    Throttled,
)
from gateway.record import RequestRecord
from gateway.routing import RouteMatch
from gateway.runtime import Runtime, Snapshot

log = logging.getLogger("gateway")

RUNTIME = web.AppKey("runtime", Runtime)

# A client's own request id is kept only when it cannot upset a log line or a header.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class Exchange:
    """What the steps learn about one request, in the order they learn it."""

    __slots__ = (
        "counted",
        "key",
        "match",
        "principal",
        "record",
        "request",
        "request_id",
        "response_headers",
        "runtime",
        "snapshot",
        "started",
    )

    def __init__(self, request: web.Request, runtime: Runtime, record: RequestRecord) -> None:
        self.started = time.perf_counter()
        self.counted = False
        self.request = request
        self.runtime = runtime
        self.snapshot: Snapshot = runtime.snapshot  # one config for the whole request
        self.record = record
        self.request_id = record.request_id
        self.response_headers: dict[str, str] = {"X-Request-ID": record.request_id}
        self.match: RouteMatch | None = None
        self.key: ApiKey | None = None
        self.principal: Principal | None = None

    def count(self) -> None:
        """Count the request in the metrics, once, before the answer is complete: a scrape
        that starts after the client has its answer (on any worker) must see it."""
        if not self.counted:
            self.counted = True
            self.record.duration = time.perf_counter() - self.started
            metrics.observe_request(self.record)

    def answered_by_upstream(self, status: int, upstream_seconds: float, bytes_sent: int) -> None:
        record = self.record
        record.status, record.code = status, "upstream"
        record.upstream_duration = upstream_seconds
        record.bytes_sent = bytes_sent
        # Should the client vanish during the last write, the log says 499 and the metrics
        # keep this 200: the answer was complete as far as the gateway could tell.
        self.count()


Step = Callable[[Exchange], Awaitable[web.StreamResponse | None]]


async def match_route(ex: Exchange) -> web.StreamResponse | None:
    """1: 404 Invalid route, 405, 410, 301/302; none of these needs a key."""
    request = ex.request
    match = ex.snapshot.routes.match(request.method, request.rel_url.raw_path)
    ex.match = match
    route = match.route
    ex.record.product = route.product
    ex.record.route = route.path
    if route.gone is not None:
        headers = {"Sunset": route.gone.sunset} if route.gone.sunset else None
        raise Gone("This route has been retired.", headers=headers)
    if route.redirect is not None:
        target = route.redirect.to
        for name, value in match.params.items():
            target = target.replace("{" + name + "}", quote(value, safe="/:@!$&'()*+,;=-._~"))
        if request.query_string:
            target += "?" + request.query_string
        status = 301 if route.redirect.permanent else 302
        ex.record.code = "redirect"
        headers = {**ex.response_headers, "Location": target}
        return web.Response(status=status, headers=headers)
    return None


async def identify_key(ex: Exchange) -> web.StreamResponse | None:
    """2: 401 without a known key."""
    request = ex.request
    query_string = request.query_string
    query = request.query if query_string else _EMPTY_QUERY
    ex.key = ex.snapshot.keys.identify(
        ex.snapshot.config.auth, request.headers, query_string, query
    )
    ex.record.key_name = ex.key.name
    return None


async def check_access(ex: Exchange) -> web.StreamResponse | None:
    """3: 403 when the key is disabled or has no plan for this product."""
    assert ex.key is not None and ex.match is not None
    ex.principal = ex.snapshot.keys.authorize(ex.key, ex.match.product.name)
    ex.record.plan = ex.principal.plan.name
    return None


async def check_params(ex: Exchange) -> web.StreamResponse | None:
    """4: 404 Wrong identifier for a path identifier, 400 for anything else declared."""
    assert ex.match is not None
    route = ex.match.route
    if route.params:
        check_path_params(route.params, ex.match.params)
    if route.query:
        check_query(route.query, ex.request.query)
    return None


async def check_maintenance(ex: Exchange) -> web.StreamResponse | None:
    """5: 503 while the product is in maintenance."""
    assert ex.match is not None
    maintenance = ex.match.product.maintenance
    if maintenance is not None:
        raise Maintenance(
            maintenance.message, headers={"Retry-After": str(maintenance.retry_after)}
        )
    return None


async def apply_limits(ex: Exchange) -> web.StreamResponse | None:
    """6 and 7: the storage must answer (or on_error: allow), then rate and quota in one step."""
    assert ex.principal is not None
    plan = ex.principal.plan
    if plan.rate is None and plan.quota is None:
        return None
    storage = ex.snapshot.config.storage
    try:
        # No timeout of our own: a limiter bounds its calls by storage.timeout itself
        # (RedisLimiter does, the memory one never waits), and a third timer per request
        # costs measurable time on the hot path.
        decision = await ex.runtime.limiter.hit(ex.principal.subject, plan.rate, plan.quota)
    except (StorageError, TimeoutError) as exc:
        ex.record.limit_outcome = "storage_error"
        metrics.observe_limit_decision(ex.record.product, plan.name, "storage_error")
        if storage.on_error == "allow":
            return None
        raise StorageUnavailable(
            "The rate-limit storage is not answering; try again shortly.",
            headers={"Retry-After": "1"},
        ) from exc
    ex.record.limit_outcome = decision.outcome
    metrics.observe_limit_decision(ex.record.product, plan.name, decision.outcome)
    headers = limit_headers(decision)
    ex.response_headers.update(headers)
    if decision.outcome == "quota_exceeded":
        raise QuotaExceeded(
            f"The {plan.name} plan's quota for '{ex.record.product}' is used up "
            f"until the period ends.",
            headers=headers,
        )
    if decision.outcome == "throttled":
        raise Throttled(
            f"More than the {plan.name} plan's rate for '{ex.record.product}'; slow down.",
            headers=headers,
        )
    return None


async def forward_upstream(ex: Exchange) -> web.StreamResponse:
    """8: the upstream's own answer, streamed; 502 and 504 when it cannot give one."""
    assert ex.match is not None
    result = await ex.runtime.upstreams.forward(
        ex.request,
        ex.match.product,
        auth=ex.snapshot.config.auth,
        request_id=ex.request_id,
        body_timeout=ex.snapshot.config.server.timeouts.client_body,
        extra_response_headers=ex.response_headers,
        on_answered=ex.answered_by_upstream,
    )
    ex.record.code = "upstream"
    ex.record.upstream_duration = result.upstream_seconds
    ex.record.bytes_sent = result.bytes_sent
    return result.response


# The contract's order of checks (§3), as the one list the request walks through.
REQUEST_PATH: tuple[Step, ...] = (
    match_route,
    identify_key,
    check_access,
    check_params,
    check_maintenance,
    apply_limits,
    forward_upstream,
)


async def handle_request(request: web.Request) -> web.StreamResponse:
    """The one handler of the proxy port: runs REQUEST_PATH and answers every failure."""
    runtime = request.app[RUNTIME]
    record = RequestRecord(
        request_id=_request_id(request),
        method=request.method,
        path=request.path,
        start=time.time(),
    )
    ex = Exchange(request, runtime, record)
    close_after = False
    metrics.INFLIGHT.inc()
    try:
        response: web.StreamResponse | None = None
        for step in REQUEST_PATH:
            response = await step(ex)
            if response is not None:
                break
        assert response is not None
        record.status = response.status
    except GatewayProblem as problem:
        response = problem_response(problem, ex.request_id, ex.response_headers)
        record.status, record.code = problem.status, problem.code
        close_after = problem.close_connection
    except (asyncio.CancelledError, ConnectionError):
        # The client went away: nobody will read an answer, but the log and metrics should.
        record.status, record.code = CLIENT_CLOSED_STATUS, CLIENT_CLOSED_CODE
        raise
    except Exception:
        log.exception("unexpected error while handling request %s", ex.request_id)
        internal = InternalError("The gateway failed to handle this request.")
        # ex.response_headers: a request that got past the limits keeps its limit headers.
        response = problem_response(internal, ex.request_id, ex.response_headers)
        record.status, record.code = internal.status, internal.code
    finally:
        metrics.INFLIGHT.dec()
        if not record.bytes_sent and response is not None and isinstance(response, web.Response):
            record.bytes_sent = len(response.body or b"")  # type: ignore[arg-type]
        # Counted before the answer leaves (a proxied one already was), so a scrape after it
        # always sees it.
        ex.count()
        record.duration = time.perf_counter() - ex.started
        accesslog.write_access_log(record)
    if close_after:
        # Send it now and cut the connection: left to aiohttp, it would first wait (up to
        # its lingering time) for the rest of a body the client is not sending.
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
    return response


def problem_response(
    problem: GatewayProblem, request_id: str, headers: dict[str, str]
) -> web.Response:
    response = web.Response(
        status=problem.status,
        # The status line says what the API's documentation calls it ("429 Quota Exceeded").
        reason=problem.title,
        body=problem.body(request_id),
        headers={**headers, **problem.headers, "Content-Type": PROBLEM_CONTENT_TYPE},
    )
    if problem.close_connection:
        response.force_close()
    return response


def _request_id(request: web.BaseRequest) -> str:
    given = request.headers.get("X-Request-ID")
    if given and _SANE_REQUEST_ID.fullmatch(given):
        return given
    return _new_request_id()


class _RequestIds:
    """Unique ids (32 hex digits) without a system call each, as os.urandom per request would
    make: a random prefix per process, drawn again in a forked child, and a counter."""

    def __init__(self) -> None:
        self._draw()
        os.register_at_fork(after_in_child=self._draw)

    def _draw(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_new_request_id = _RequestIds()


_EMPTY_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())
