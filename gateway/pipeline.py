"""The request path: one step per check of the order of checks (README, "How a request is
answered"), in the order it promises, as the one list `REQUEST_PATH`.

Each step either lets the request go on (returns None), answers it (returns an `Answer`, as a
redirect does, or as forwarding does once the upstream's answer is sent), or raises a
GatewayProblem that `handle_request` turns into problem+json (an error of the HTTP layer is
mapped to one first). Steps that never wait are plain functions; the others are coroutines.
Nothing before `apply_limits` touches the limit storage, so nothing that fails earlier uses up
rate or quota.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import quote

from gateway import accesslog, metrics
from gateway.auth import identify_presented
from gateway.cost_reports import BodyCost, CostReading, HeaderCost
from gateway.exchange import Exchange
from gateway.http.errors import HttpError, RequestError
from gateway.http.headers import strip_query_param
from gateway.http.paths import hides_dot_segment
from gateway.http.request import Request
from gateway.http.wire import CLOSE, date_line, encode_header_block, status_line
from gateway.limits.base import StorageError
from gateway.limits.headers import limit_headers
from gateway.limits.metering import local_rate
from gateway.params import check_path_params, check_query
from gateway.problems import (
    CLIENT_CLOSED_CODE,
    CLIENT_CLOSED_STATUS,
    REQUEST_ID_HEADER,
    BadRequest,
    GatewayProblem,
    Gone,
    InternalError,
    Maintenance,
    MethodNotAllowed,
    QuotaExceeded,
    StorageUnavailable,
    Throttled,
    Unauthorized,
    problem_from_http_error,
    render_problem,
)
from gateway.proxy import forward
from gateway.record import RequestRecord, new_request_id, request_id_for

if TYPE_CHECKING:
    from gateway.runtime import Runtime

log = logging.getLogger("gateway")


@dataclass(slots=True)
class Answer:
    """How a step answered: an answer of the gateway's own to send (a redirect), or, with
    `sent`, the upstream's answer that has already gone to the client."""

    status: int
    headers: dict[str, str]
    sent: bool = False


# A step answers at once (a plain function) or after waiting (a coroutine function).
Step = Callable[[Exchange], Answer | None] | Callable[[Exchange], Awaitable[Answer | None]]


def match_route(ex: Exchange) -> Answer | None:
    """1: 404 Invalid route, 405, 410, 301/302; none of these needs a key."""
    request = ex.request
    if hides_dot_segment(request.raw_path):
        # Routed as it reads here, it could reach another route behind some upstreams.
        raise BadRequest("The path hides a dot segment behind %2F, %5C, a backslash or ';'.")
    try:
        match = ex.snapshot.routes.match(request.method, request.raw_path)
    except MethodNotAllowed as refused:
        # The path is a route's: counted and logged under it, as any other answer of it.
        ex.product, ex.route = refused.product, refused.route
        raise
    ex.match = match
    route = match.route
    ex.product = route.product
    ex.route = route.path
    if route.gone is not None:
        headers = {"Sunset": route.gone.sunset} if route.gone.sunset else None
        raise Gone("This route has been retired.", headers=headers)
    if route.redirect is not None:
        target = route.redirect.to
        for name, value in match.raw_params.items():
            # Escapes are kept as they are (`%` is safe); anything else a path may not hold
            # unescaped is escaped.
            target = target.replace("{" + name + "}", quote(value, safe="/%:@!$&'()*+,;=-._~"))
        # The request's query is kept, but never its key: `to` may name another host.
        query = strip_query_param(request.query_string, ex.snapshot.config.auth.query_param)
        if query:
            # A target with a query of its own keeps it, the request's joining after it.
            target += ("&" if "?" in target else "?") + query
        status = 301 if route.redirect.permanent else 302
        ex.code = "redirect"
        headers = {REQUEST_ID_HEADER: ex.request_id, "Location": target}
        return Answer(status, headers)
    return None


def identify_key(ex: Exchange) -> Answer | None:
    """2: 401 without a known key (or with two different ones)."""
    snapshot = ex.snapshot
    auth = snapshot.config.auth
    try:
        ex.key = identify_presented(ex.request, auth, snapshot.key_header, snapshot.keys)
    except Unauthorized as refused:
        ex.key_name = refused.key_name  # a known key no longer taken is named in the log
        raise
    ex.key_name = ex.key.name
    return None


def check_access(ex: Exchange) -> Answer | None:
    """3: 403 when the key is disabled or has no plan for this product."""
    assert ex.key is not None and ex.match is not None
    ex.principal = ex.snapshot.keys.authorize(ex.key, ex.match.product.name)
    ex.plan = ex.principal.plan.name
    return None


def check_params(ex: Exchange) -> Answer | None:
    """4: 404 Wrong identifier for a path identifier, 400 for anything else declared."""
    assert ex.match is not None
    route = ex.match.route
    if route.params:
        check_path_params(route.params, ex.match.params)
    if route.query:
        check_query(route.query, ex.request.query)
    return None


def check_maintenance(ex: Exchange) -> Answer | None:
    """5: 503 while the product is in maintenance."""
    assert ex.match is not None
    maintenance = ex.match.product.maintenance
    if maintenance is not None:
        raise Maintenance(
            maintenance.message, headers={"Retry-After": str(maintenance.retry_after)}
        )
    return None


async def apply_limits(ex: Exchange) -> Answer | None:
    """6 and 7: the storage must answer (or on_error says otherwise), then rate and quota in
    one step, which also counts the request in the day's history (README, "Metering")."""
    assert ex.principal is not None and ex.match is not None
    broken = ex.request.content.error
    if isinstance(broken, HttpError):
        # The parser refused the body already (bad chunk framing that came with the head):
        # the request was never valid HTTP, so it is answered without being charged.
        raise broken
    principal = ex.principal
    plan = principal.plan
    route = ex.match.route
    cost = route.cost
    try:
        # No timeout of our own: a limiter bounds its calls by storage.timeout itself
        # (RedisLimiter does, the memory one never waits), and a third timer per request
        # costs measurable time on the hot path. A route whose upstream reports the cost,
        # and a plan that refunds some outcomes, ask for a receipt to settle it by.
        decision = await ex.runtime.limiter.hit(
            principal.subject,
            plan.rate,
            plan.quota,
            cost,
            plan.name,
            ex.decided_after_leaving,
            route.reports_cost or bool(plan.refund_on),
        )
    except (StorageError, TimeoutError) as exc:
        return await _storage_away(ex, exc)
    ex.count_decision(decision)
    if plan.rate is None and plan.quota is None:
        # No limit decided anything: no limit headers; a reported cost still settles the
        # day's units, which bill such a plan.
        ex.receipt = decision.receipt
        return None
    outcome = decision.outcome
    if outcome == "allowed":
        ex.admit(decision)
        ex.receipt = decision.receipt
        return None
    # A refusal carries its limit headers in the problem it raises.
    headers = limit_headers(decision)
    if outcome == "quota_exceeded":
        assert decision.quota is not None  # a quota refused it
        whole = decision.quota.limit
        detail = (
            f"This route costs {cost} units, more than the whole quota of the {plan.name} "
            f"plan for '{ex.product}' ({whole}): no period admits it without more credit."
            if cost > whole
            else f"The {plan.name} plan's quota for '{ex.product}' is used up until the period "
            "ends."
        )
        raise QuotaExceeded(detail, headers=headers)
    raise _throttled(ex, plan.name, headers)


def _throttled(ex: Exchange, plan: str, headers: dict[str, str]) -> Throttled:
    return Throttled(
        f"More than the {plan} plan's rate for '{ex.product}'; slow down.", headers=headers
    )


async def _storage_away(ex: Exchange, error: Exception) -> Answer | None:
    """Step 6 when the storage did not answer: 503, or admit (on_error: allow), or each
    process enforces the rate on its own (on_error: local). A plan with no limit is no
    exception: its requests are billed from the history, which cannot count them now."""
    assert ex.principal is not None
    plan = ex.principal.plan
    storage = ex.snapshot.config.storage
    if storage.on_error == "local":
        rate = plan.rate
        if rate is None:  # the quota is not checked while the storage is away
            metrics.observe_limit_decision(ex.product, plan.name, "local_allowed")
            return None
        # The local share of this plan's rate; the quota is not checked, nothing is counted.
        decision = await ex.runtime.local_limiter.hit(
            ex.principal.subject, local_rate(rate, storage.local_fraction), None
        )
        if decision.allowed:
            ex.admit(decision)
            metrics.observe_limit_decision(ex.product, plan.name, "local_allowed")
            return None
        metrics.observe_limit_decision(ex.product, plan.name, "local_throttled")
        raise _throttled(ex, plan.name, limit_headers(decision))
    metrics.observe_limit_decision(ex.product, plan.name, "storage_error")
    if storage.on_error == "allow":
        return None
    raise StorageUnavailable() from error


async def forward_upstream(ex: Exchange) -> Answer:
    """8: the upstream's own answer, streamed; 502 and 504 when it cannot give one."""
    assert ex.match is not None
    snapshot = ex.snapshot
    config = snapshot.config
    request = ex.request
    tunnel_idle = None
    if ex.match.route.websocket and request.upgrade and _asks_for_websocket(request):
        tunnel_idle = config.server.timeouts.websocket_idle
    destination = snapshot.destinations[ex.product]
    identity = None
    if destination.product.upstream.identity_headers:
        # Names are ASCII by their rule; the client's lines of these names were dropped.
        identity = [
            (b"X-Gateway-Key-Name", ex.key_name.encode("ascii")),
            (b"X-Gateway-Plan", ex.plan.encode("ascii")),
        ]
    cost_reading: CostReading | None = None
    route = ex.match.route
    drop = snapshot.request_drop
    if route.cost_field is not None:
        # A body the gateway can read: not encoded. Asked so even when it is not read, so
        # that what the route's upstream sends (and its client gets) does not depend on
        # whether the storage answered.
        drop = snapshot.request_drop_for_body
    if route.reports_cost and ex.receipt is not None:
        # Read only when the limits took units to settle (a storage away took none).
        if route.cost_header is not None:
            cost_reading = HeaderCost(route.cost_header, ex.report_cost)
        else:
            assert route.cost_field is not None
            cost_reading = BodyCost(route.cost_field, ex.report_cost)
    result = await forward(
        request,
        destination,
        drop,
        config.auth.query_param,
        ex.request_id,
        config.server.timeouts.client_body,
        ex.upstream_answer_headers(),
        ex.answered_by_upstream,
        tunnel_idle,
        ex.cut_by_client,
        identity,
        cost_reading,
    )
    if result.status == 101:
        # A WebSocket, over now: recorded (and counted, by handle_request) as it ends.
        ex.status, ex.code = 101, "upstream"
        ex.upstream_duration = result.upstream_seconds
        ex.bytes_sent, ex.bytes_received = result.bytes_sent, result.bytes_received
        metrics.count_websocket_bytes(ex.product, result.bytes_received or 0, result.bytes_sent)
    elif result.error is not None:
        # Cut short after the head: the answered-hook, which records complete answers, never
        # ran for it.
        ex.status, ex.code = result.status, "upstream"
        ex.upstream_duration = result.upstream_seconds
        ex.bytes_sent = result.bytes_sent
    return _SENT


def _asks_for_websocket(request: Request) -> bool:
    """A GET whose Upgrade header names websocket (RFC 6455 §4.1), in any case."""
    if request.method != "GET":
        return False
    protocols = request.header(b"upgrade") or ""
    return any(token.strip().lower() == "websocket" for token in protocols.split(","))


# The upstream's answer has gone to the client; handle_request has nothing left to send.
_SENT = Answer(0, {}, sent=True)


# The order of checks (README, "How a request is answered"): the one list a request walks.
REQUEST_PATH: tuple[Step, ...] = (
    match_route,
    identify_key,
    check_access,
    check_params,
    check_maintenance,
    apply_limits,
    forward_upstream,
)
# Each step with whether it must be awaited, decided once rather than per request.
_STEPS: tuple[tuple[Step, bool], ...] = tuple(
    (step, inspect.iscoroutinefunction(step)) for step in REQUEST_PATH
)


async def handle_request(runtime: Runtime, request: Request) -> None:
    """The one handler of the proxy port: runs REQUEST_PATH and answers every failure."""
    ex = record = Exchange(request, runtime)
    metrics.INFLIGHT.inc()
    own: tuple[int, str, bytes, bytes, bool] | None = None  # status, reason, head, body, close
    try:
        answer: Answer | None = None
        for step, waits in _STEPS:
            result = step(ex)
            # `waits` says which of Step's two kinds this is; mypy cannot follow that, and
            # typing.cast, a Python call, cost 0.6% of a request seven times over
            # (bench/PROFILE.md, "Session 5"): the types are asserted by ignores instead.
            answer = await result if waits else result  # type: ignore[misc,assignment]
            if answer is not None:
                break
        assert answer is not None
        if not answer.sent:
            record.status = answer.status
            reason = HTTPStatus(answer.status).phrase
            own = (answer.status, reason, encode_header_block(answer.headers), b"", False)
    except (GatewayProblem, HttpError) as error:
        problem = (
            error
            if isinstance(error, GatewayProblem)
            else problem_from_http_error(error, ex.product)
        )
        own = _problem_answer(problem, ex.request_id, ex.own_headers())
        record.status, record.code = problem.status, problem.code
        # Held here, the raised problem and this frame (in its traceback) would hold each
        # other: a cycle only the collector frees, and one a reload's collector pause can
        # freeze for good, old config and all (`reload.freeze_long_lived`).
        del problem
    except (asyncio.CancelledError, ConnectionError):
        # The client went away: nobody will read an answer, but the log and metrics should.
        record.status, record.code = CLIENT_CLOSED_STATUS, CLIENT_CLOSED_CODE
        raise
    except Exception:
        log.exception("unexpected error while handling request %s", ex.request_id)
        internal = InternalError("The gateway failed to handle this request.")
        # A request that got past the limits keeps its limit headers.
        own = _problem_answer(internal, ex.request_id, ex.own_headers())
        record.status, record.code = internal.status, internal.code
    finally:
        metrics.INFLIGHT.dec()
        receipt = ex.receipt
        if receipt is not None:
            ex.settle(receipt)
        if own is not None and request.method != "HEAD":
            record.bytes_sent = len(own[3])
        # Counted before the answer leaves (a proxied one already was), so a scrape after it
        # always sees it.
        ex.count()
        record.duration = time.perf_counter() - ex.started
        accesslog.write_access_log(record)
    if own is not None:
        status, reason, block, body, close = own
        connection = request.connection
        if connection.answer_started:
            connection.abort()  # part of another answer is out: only a cut can tell
        else:
            connection.respond(request, status, reason, block, body, close=close)


def _problem_answer(
    problem: GatewayProblem, request_id: str, headers: dict[str, str]
) -> tuple[int, str, bytes, bytes, bool]:
    """A problem as (status, reason, header block, body, close)."""
    problem_headers, body = render_problem(problem, request_id, headers)
    # The status line says what the API's documentation calls it ("429 Quota Exceeded").
    return (
        problem.status,
        problem.title,
        encode_header_block(problem_headers),
        body,
        problem.close_connection,
    )


def answer_request_error(
    error: RequestError, started: float, method: str, path: str, request_id_header: bytes | None
) -> bytes:
    """The whole answer to a request the HTTP server could not read (400 for one that is not
    HTTP, 408 for a head too slow), recorded like any other; the connection closes after it."""
    problem = problem_from_http_error(error)
    request_id = (
        request_id_for(request_id_header.decode("latin-1"))
        if request_id_header
        else new_request_id()
    )
    headers, body = render_problem(problem, request_id)
    record = RequestRecord(request_id, method, path, started)
    record.status, record.code = problem.status, problem.code
    record.duration = time.time() - started
    record.bytes_sent = len(body)
    metrics.observe_request(record)
    accesslog.write_access_log(record)
    return (
        status_line(problem.status, problem.title)
        + encode_header_block(headers)
        + date_line()
        + b"Content-Length: %d\r\n" % len(body)
        + CLOSE
        + b"\r\n"
        + body
    )
