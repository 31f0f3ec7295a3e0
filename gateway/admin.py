"""The admin port (README, "The admin port"): metrics, health, readiness and the usage API.

    GET    /metrics                            Prometheus text, all workers summed
    GET    /healthz                            200 while the process serves
    GET    /readyz                             200 when a config is loaded and the storage answers
    GET    /admin/usage/{key_name}             per product: plan, rate, and quota use
    DELETE /admin/usage/{key_name}/{product}   start that quota afresh; 204

With a token, `/admin/*` requires `Authorization: Bearer <token>` (401 `unauthorized` otherwise);
the probes and /metrics never do, so orchestrators and Prometheus need no secret. Errors are
problem+json like the proxy's own; the admin API adds 404 "Not Found" `not_found` for an
unknown key or product.
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
from gateway.limits.base import Limiter, StorageError
from gateway.metrics import render_metrics
from gateway.problems import (
    GatewayProblem,
    MethodNotAllowed,
    StorageUnavailable,
    Unauthorized,
    render_problem,
)
from gateway.record import new_request_id

_T = TypeVar("_T")

ConfigGetter = Callable[[], Config]  # the config the worker serves right now
Clock = Callable[[], float]


class NotFound(GatewayProblem):
    status, title, code = 404, "Not Found", "not_found"


@dataclass(frozen=True, slots=True)
class AdminState:
    get_config: ConfigGetter
    limiter: Limiter
    token: bytes | None
    clock: Clock


ADMIN_STATE = web.AppKey("admin_state", AdminState)


def build_admin_app(
    get_config: ConfigGetter, limiter: Limiter, *, token: str | None, clock: Clock = time.time
) -> web.Application:
    """The admin application of one worker; `token` is GATEWAY_ADMIN_TOKEN (None: no auth)."""
    if token == "":
        # "Bearer " with nothing after it must not open the admin API.
        raise ValueError("the admin token must not be empty")
    app = web.Application(middlewares=[_problems_and_auth])
    app[ADMIN_STATE] = AdminState(
        get_config=get_config,
        limiter=limiter,
        token=token.encode() if token is not None else None,
        clock=clock,
    )
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/admin/usage/{key_name}", _get_usage)
    app.router.add_delete("/admin/usage/{key_name}/{product}", _reset_usage)
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
    return web.json_response({"status": "ready"})


async def _get_usage(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    config = state.get_config()
    key = _find_key(config, request.match_info["key_name"])
    products: dict[str, Any] = {}
    for product, plan_name in sorted(key.plans.items()):
        plan = config.plans[plan_name]
        quota: dict[str, Any] | None = None
        if plan.quota is not None:
            quota = await _quota_usage(state, f"{key.name}:{product}", plan.quota)
        products[product] = {"plan": plan_name, "rate": _rate_json(plan), "quota": quota}
    return web.json_response({"key": key.name, "disabled": key.disabled, "products": products})


async def _reset_usage(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    config = state.get_config()
    key = _find_key(config, request.match_info["key_name"])
    product = request.match_info["product"]
    plan_name = key.plans.get(product)
    if plan_name is None:
        raise NotFound(f"Key '{key.name}' has no plan for product '{product}'.")
    quota = config.plans[plan_name].quota
    if quota is None:
        raise NotFound(f"Plan '{plan_name}' of product '{product}' has no quota to reset.")
    await _within_storage_timeout(state, state.limiter.reset_quota(f"{key.name}:{product}", quota))
    return web.Response(status=204)


def _find_key(config: Config, name: str) -> ApiKey:
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
