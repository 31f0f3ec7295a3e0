"""The admin port (README, "The admin port"): metrics, health, readiness and the usage API.

    GET    /metrics                            Prometheus text, all workers summed
    GET    /healthz                            200 while the process serves
    GET    /readyz                             200 when a config is loaded and the storage answers
    GET    /admin/usage/{key_name}             per product: plan, rate, and quota use
    DELETE /admin/usage/{key_name}/{product}   start that quota afresh; 204
    /admin/keys...                             the keys API (gateway.keys.api)

With a token, `/admin/*` requires `Authorization: Bearer <token>` (401 `unauthorized` otherwise);
the probes and /metrics never do, so orchestrators and Prometheus need no secret. Errors are
problem+json like the proxy's own; the admin API adds 404 "Not Found" `not_found` for an
unknown key or product, and 409 "Conflict" `conflict` in the keys API.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web

from gateway.config.model import ApiKey, Config, Plan, QuotaRule
from gateway.keys.api import KeysAccess, add_key_routes
from gateway.limits.base import Limiter, StorageError
from gateway.metrics import render_metrics
from gateway.problems import (
    GatewayProblem,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    StorageUnavailable,
    Unauthorized,
    render_problem,
)
from gateway.record import new_request_id

_T = TypeVar("_T")

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


ADMIN_STATE = web.AppKey("admin_state", AdminState)


def build_admin_app(
    get_config: ConfigGetter,
    limiter: Limiter,
    *,
    token: str | None,
    clock: Clock = time.time,
    keys: KeysAccess | None = None,
) -> web.Application:
    """The admin application of one worker; `token` is GATEWAY_ADMIN_TOKEN (None: no auth);
    `keys` adds the keys API."""
    if token == "":
        # "Bearer " with nothing after it must not open the admin API.
        raise ValueError("the admin token must not be empty")
    app = web.Application(middlewares=[_problems_and_auth])
    app[ADMIN_STATE] = AdminState(
        get_config=get_config,
        limiter=limiter,
        token=token.encode() if token is not None else None,
        clock=clock,
        keys=keys,
    )
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/admin/usage/{key_name}", _get_usage)
    app.router.add_delete("/admin/usage/{key_name}/{product}", _reset_usage)
    if keys is not None:
        add_key_routes(app, keys)
    return app


@web.middleware
async def _problems_and_auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        if request.path == "/admin" or request.path.startswith("/admin/"):
            _authorize(request, request.app[ADMIN_STATE].token)
        return await handler(request)
    except GatewayProblem as problem:
        return _problem_response(problem)
    except web.HTTPNotFound:
        return _problem_response(NotFound(f"Nothing is served at {request.path} on this port."))
    except web.HTTPMethodNotAllowed as exc:
        allow = ", ".join(sorted(exc.allowed_methods))
        return _problem_response(
            MethodNotAllowed(f"{request.method} is not allowed here.", headers={"Allow": allow})
        )


def _authorize(request: web.Request, token: bytes | None) -> None:
    if token is None:
        return
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token):
        return
    raise Unauthorized(
        "The admin API needs 'Authorization: Bearer <token>' with the admin token.",
        headers={"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
    )


def _problem_response(problem: GatewayProblem) -> web.Response:
    headers, body = render_problem(problem, new_request_id())
    return web.Response(status=problem.status, body=body, headers=headers)


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = render_metrics()
    # The content type carries parameters (version, charset) that `content_type=` would reject.
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    await _within_storage_timeout(state, state.limiter.ping())
    if state.keys is not None and not state.keys.store.table.loaded:
        raise NotReady("The API keys are not loaded from the storage yet.")
    return web.json_response({"status": "ready"})


async def _get_usage(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    config = state.get_config()
    key = _find_key(state, config, request.match_info["key_name"])
    products: dict[str, Any] = {}
    for product, plan_name in sorted(key.plans.items()):
        plan = config.plans.get(plan_name)
        if plan is None:  # an API key's plan that the running config no longer declares
            continue
        quota: dict[str, Any] | None = None
        if plan.quota is not None:
            quota = await _quota_usage(state, f"{key.name}:{product}", plan.quota)
        products[product] = {"plan": plan_name, "rate": _rate_json(plan), "quota": quota}
    return web.json_response({"key": key.name, "disabled": key.disabled, "products": products})


async def _reset_usage(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    config = state.get_config()
    key = _find_key(state, config, request.match_info["key_name"])
    product = request.match_info["product"]
    plan_name = key.plans.get(product)
    plan = None if plan_name is None else config.plans.get(plan_name)
    if plan is None:
        raise NotFound(f"Key '{key.name}' has no plan for product '{product}'.")
    quota = plan.quota
    if quota is None:
        raise NotFound(f"Plan '{plan_name}' of product '{product}' has no quota to reset.")
    await _within_storage_timeout(state, state.limiter.reset_quota(f"{key.name}:{product}", quota))
    return web.Response(status=204)


def _find_key(state: AdminState, config: Config, name: str) -> ApiKey:
    """The file's key called `name`, else the API's."""
    if state.keys is not None:
        key = state.keys.get_snapshot().keys.by_name(name)
    else:
        key = config.key_by_name(name)
    if key is None:
        raise NotFound(f"No key is named '{name}'.")
    return key


async def _within_storage_timeout(state: AdminState, call: Awaitable[_T]) -> _T:
    try:
        async with asyncio.timeout(state.get_config().storage.timeout):
            return await call
    except (StorageError, TimeoutError) as exc:
        raise StorageUnavailable() from exc


async def _quota_usage(state: AdminState, subject: str, quota: QuotaRule) -> dict[str, Any]:
    usage = await _within_storage_timeout(state, state.limiter.usage(subject, quota))
    return {
        "limit": usage.limit,
        "per": quota.per,
        "timezone": quota.timezone.key,
        "used": usage.used,
        "remaining": usage.remaining,
        "reset": _rfc3339(usage.reset_at),
        "reset_seconds": max(0, math.ceil(usage.reset_at - state.clock())),
    }


def _rate_json(plan: Plan) -> dict[str, Any] | None:
    if plan.rate is None:
        return None
    return {"limit": plan.rate.limit, "per": plan.rate.per, "window_seconds": plan.rate.window}


def _rfc3339(unix_time: float) -> str:
    moment = datetime.fromtimestamp(unix_time, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
