"""The admin port (README, "The admin port"): metrics, health, readiness and the usage API.

    GET    /metrics                            Prometheus text, all workers summed
    GET    /healthz                            200 while the process serves
    GET    /readyz                             200 when a config is loaded and the storage answers
    GET    /admin/usage/{key_name}             per product: plan, rate, and quota use
    DELETE /admin/usage/{key_name}/{product}   start that quota afresh (credit stays); 204
    POST   /admin/usage/{key_name}/{product}/credit   {"amount": N}: N more units this period
    GET    /admin/usage/{key_name}/history?from=YYYY-MM-DD&to=YYYY-MM-DD   requests, units per day
    GET    /admin/usage.csv?from=YYYY-MM-DD&to=YYYY-MM-DD   every key's days, streamed as CSV
    /admin/keys...                             the keys API (gateway.keys.api)

With a token, `/admin/*` requires `Authorization: Bearer <token>` (401 `unauthorized` otherwise);
the probes and /metrics never do, so orchestrators and Prometheus need no secret. Errors are
problem+json like the proxy's own; the admin API adds 404 "Not Found" `not_found` for an
unknown key or product, 400 "Bad Request" naming the field of a bad body or query, and 409
"Conflict" `conflict` in the keys API.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.admin_json import BODY_TIMEOUT, json_object, only_fields
from gateway.config.instants import format_instant
from gateway.config.model import MAX_COUNT, ApiKey, Config, Plan, QuotaRule
from gateway.keys.api import KeysAccess, add_key_routes
from gateway.limits.base import (
    HISTORY_DAYS,
    DayUsage,
    Limiter,
    QuotaUsage,
    StorageError,
    day_number,
    day_of,
    day_text,
)
from gateway.metrics import render_metrics
from gateway.problems import (
    REQUEST_ID_HEADER,
    BadRequest,
    Conflict,
    ContentTooLarge,
    GatewayProblem,
    InternalError,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    StorageUnavailable,
    Unauthorized,
    render_problem,
)
from gateway.record import request_id_for

_T = TypeVar("_T")
log = logging.getLogger(__name__)

ConfigGetter = Callable[[], Config]  # the config the worker serves right now
Clock = Callable[[], float]


class NotReady(ServiceUnavailable):
    code = "not_ready"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


@dataclass(frozen=True, slots=True)
class AdminState:
    get_config: ConfigGetter
    limiter: Limiter
    token: bytes | None
    clock: Clock
    keys: KeysAccess | None  # None: no keys API (the usage API serves the file's keys)
    draining: Callable[[], bool]  # the process is stopping: not ready for new traffic


ADMIN_STATE = web.AppKey("admin_state", AdminState)


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
    app = web.Application(middlewares=[_problems_and_auth], client_max_size=_MAX_BODY)
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
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    # No HEAD: the export streams, and a HEAD would run it all for a head that cannot say its
    # length (aiohttp's automatic HEAD also sent the body).
    app.router.add_get("/admin/usage.csv", _usage_csv, allow_head=False)
    app.router.add_get("/admin/usage/{key_name}", _get_usage)
    app.router.add_delete("/admin/usage/{key_name}/{product}", _reset_usage)
    app.router.add_post("/admin/usage/{key_name}/{product}/credit", _add_credit)
    app.router.add_get("/admin/usage/{key_name}/history", _get_history)
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
async def _problems_and_auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request_id = _request_id(request)
    try:
        if request.path == "/admin" or request.path.startswith("/admin/"):
            _authorize(request, request.app[ADMIN_STATE].token)
        return await handler(request)
    except GatewayProblem as problem:
        return _problem_response(problem, request_id)
    except web.HTTPNotFound:
        missing = NotFound(f"Nothing is served at {request.path} on this port.")
        return _problem_response(missing, request_id)
    except web.HTTPMethodNotAllowed as exc:
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
    await _within_storage_timeout(state, state.limiter.ping())
    if state.keys is not None and not state.keys.store.table.loaded:
        raise NotReady("The API keys are not loaded from the storage yet.")
    return web.json_response({"status": "ready"})


async def _get_usage(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    key = _find_key(state, state.get_config(), request.match_info["key_name"])
    return web.json_response(await _usage_of(state, key))


async def _usage_of(
    state: AdminState, key: ApiKey, known: dict[str, QuotaUsage] | None = None
) -> dict[str, Any]:
    """The key's plan, rate and quota use on each of its products (limits with overrides);
    `known`: the quota use of some products (by product) as a storage call just answered it,
    not asked again."""
    config = state.get_config()
    products: dict[str, Any] = {}
    for product in sorted(key.plans):
        plan = key.plan_for(product, config.plans)
        if plan is None:  # an API key's plan that the running config no longer declares
            continue
        quota: dict[str, Any] | None = None
        if plan.quota is not None:
            usage = (known or {}).get(product)
            if usage is None:
                usage = await _within_storage_timeout(
                    state, state.limiter.usage(f"{key.name}:{product}", plan.quota)
                )
            quota = _quota_json(state, plan.quota, usage)
        products[product] = {"plan": plan.name, "rate": _rate_json(plan), "quota": quota}
    return {"key": key.name, "disabled": key.disabled, "products": products}


async def _reset_usage(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    key, product, quota = _key_quota(request, state, "to reset")
    await _within_storage_timeout(state, state.limiter.reset_quota(f"{key.name}:{product}", quota))
    return web.Response(status=204)


# An idempotency key: what payment APIs accept (Stripe's up to 255 characters), printable
# ASCII so that it is safe inside a Redis key name and a log line.
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


async def _add_credit(request: web.Request) -> web.Response:
    """A credit answered 503 may still be applied later (the storage may run a command it got
    after the gateway stopped waiting): a retry with the same `Idempotency-Key` adds it once."""
    state = request.app[ADMIN_STATE]
    key, product, quota = _key_quota(request, state, "to credit")
    given = request.headers.getall("Idempotency-Key", [])
    if len(given) > 1:
        raise BadRequest("Idempotency-Key: given twice; send one.")
    once = given[0] if given else None
    if once is not None and _IDEMPOTENCY_KEY.fullmatch(once) is None:
        raise BadRequest("Idempotency-Key: must be 1 to 255 visible ASCII characters.")
    body = only_fields(await json_object(request, required=True), ("amount",))
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= MAX_COUNT:
        raise BadRequest(f"amount: must be a whole number from 1 to {MAX_COUNT}.")
    subject = f"{key.name}:{product}"
    credited = await _within_storage_timeout(
        state, state.limiter.credit(subject, quota, amount, once)
    )
    if credited.replayed and credited.amount != amount:
        raise Conflict(
            f"Idempotency-Key '{once}' was used for a credit of {credited.amount} units,"
            f" not {amount}."
        )
    headers = {"Idempotent-Replayed": "true"} if credited.replayed else None
    usage = await _usage_of(state, key, {product: credited.usage})
    return web.json_response(usage, headers=headers)


def _key_quota(
    request: web.Request, state: AdminState, purpose: str
) -> tuple[ApiKey, str, QuotaRule]:
    """The key, product and quota a /admin/usage/{key_name}/{product} call is about, or 404."""
    config = state.get_config()
    key = _find_key(state, config, request.match_info["key_name"])
    product = request.match_info["product"]
    plan = key.plan_for(product, config.plans)
    if plan is None:
        raise NotFound(f"Key '{key.name}' has no plan for product '{product}'.")
    if plan.quota is None:
        raise NotFound(f"Plan '{plan.name}' of product '{product}' has no quota {purpose}.")
    return key, product, plan.quota


async def _get_history(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    name = request.match_info["key_name"]
    first, last = _day_range(request)
    days = await _within_storage_timeout(state, state.limiter.history(name, first, last))
    if not days and _key_named(state, state.get_config(), name) is None:
        raise NotFound(f"No key is named '{name}', and none by that name has history.")
    return web.json_response(
        {
            "key": name,
            "from": day_text(first),
            "to": day_text(last),
            "days": [
                {
                    "date": day_text(line.day),
                    "product": line.subject.partition(":")[2],
                    "plan": line.plan,
                    "requests": line.requests,
                    "units": line.units,
                }
                for line in days
            ],
        }
    )


CSV_HEADER = b"date,key,product,plan,requests,units\n"


async def _usage_csv(request: web.Request) -> web.StreamResponse:
    """The billing export, streamed a batch at a time as the storage hands them over. A
    storage failure before the first line is a 503; after it, the answer is cut short (no
    final chunk), so that a client cannot take a truncated export for a whole one."""
    state = request.app[ADMIN_STATE]
    first, last = _day_range(request)
    batches = state.limiter.export(first, last)
    try:
        try:
            batch: list[DayUsage] | None = await anext(batches)
        except StopAsyncIteration:
            batch = None
        except (StorageError, TimeoutError) as exc:
            raise StorageUnavailable() from exc
        name = f"usage-{day_text(first)}-{day_text(last)}.csv"
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8",
                "Content-Disposition": f'attachment; filename="{name}"',
            }
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(CSV_HEADER)
        while batch is not None:
            await response.write(_csv_lines(batch))
            try:
                batch = await anext(batches)
            except StopAsyncIteration:
                batch = None
            except (StorageError, TimeoutError):
                log.exception("the usage export failed after it began; the answer is cut short")
                if request.transport is not None:
                    request.transport.abort()
                return response
        await response.write_eof()
        return response
    finally:
        await batches.aclose()


def _csv_lines(batch: list[DayUsage]) -> bytes:
    # Key names, products and plans are names of [A-Za-z0-9._-]: nothing to quote.
    return "".join(
        f"{day_text(line.day)},{line.subject.replace(':', ',', 1)},{line.plan},"
        f"{line.requests},{line.units}\n"
        for line in batch
    ).encode()


_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _day_range(request: web.Request) -> tuple[int, int]:
    """`from` and `to` (UTC dates, both included) within the history kept; by default `to` is
    today and `from` the first of its month. 400 naming the parameter when it is not a date."""
    today = day_of(request.app[ADMIN_STATE].clock())
    days: dict[str, int] = {}
    for name in ("from", "to"):
        text = request.query.get(name)
        if text is None:
            continue
        if not _DATE.fullmatch(text):
            raise BadRequest(f"{name}: must be a date like 2026-12-01 (YYYY-MM-DD), not {text!r}.")
        try:
            days[name] = day_number(text)
        except ValueError:
            raise BadRequest(f"{name}: {text!r} is not a date in the calendar.") from None
    if "from" in days and "to" in days and days["from"] > days["to"]:
        raise BadRequest("from: must not be after to.")
    last = min(days.get("to", today), today)
    first = days.get("from", day_number(day_text(last)[:8] + "01"))
    if first > last:
        raise BadRequest(f"from: must not be after to (by default today, {day_text(today)}).")
    oldest = today - HISTORY_DAYS
    if last < oldest:
        raise BadRequest(
            f"to: history is kept for {HISTORY_DAYS} days, from {day_text(oldest)} on."
        )
    return max(first, oldest), last


def _find_key(state: AdminState, config: Config, name: str) -> ApiKey:
    """The file's key called `name`, else the API's; 404 when neither has it."""
    key = _key_named(state, config, name)
    if key is None:
        raise NotFound(f"No key is named '{name}'.")
    return key


def _key_named(state: AdminState, config: Config, name: str) -> ApiKey | None:
    if state.keys is not None:
        return state.keys.get_snapshot().keys.by_name(name)
    return config.key_by_name(name)


# The limiter bounds each of its storage calls by storage.timeout and counts those that fail
# (gateway_storage_errors_total); the admin's own bound is a backstop behind it. The same
# bound would cut in first (its timer is older) and leave timeouts uncounted.
_BACKSTOP_SLACK = 0.1


async def _within_storage_timeout(state: AdminState, call: Awaitable[_T]) -> _T:
    try:
        async with asyncio.timeout(state.get_config().storage.timeout + _BACKSTOP_SLACK):
            return await call
    except (StorageError, TimeoutError) as exc:
        # The 503 says only "try again"; what the storage said is for the operator.
        log.warning("admin API: %s", str(exc) or "the storage did not answer in time")
        raise StorageUnavailable() from exc


def _quota_json(state: AdminState, quota: QuotaRule, usage: QuotaUsage) -> dict[str, Any]:
    return {
        "limit": usage.limit,
        "credit": usage.credit,
        "per": quota.per,
        "timezone": quota.timezone.key,
        "used": usage.used,
        "remaining": usage.remaining,
        "reset": format_instant(usage.reset_at),
        "reset_seconds": max(0, math.ceil(usage.reset_at - state.clock())),
    }


def _rate_json(plan: Plan) -> dict[str, Any] | None:
    if plan.rate is None:
        return None
    return {"limit": plan.rate.limit, "per": plan.rate.per, "window_seconds": plan.rate.window}
