"""The admin port of the contract's §6: metrics, health, readiness and the usage API.

    GET    /metrics                            Prometheus text, all workers summed
    GET    /healthz                            200 while the process serves
    GET    /readyz                             200 when a config is loaded and the storage answers
    GET    /admin/usage/{key_name}             per product: plan, rate, and quota use
    DELETE /admin/usage/{key_name}/{product}   start that quota afresh; 204

With a token, `/admin/*` requires `Authorization: Bearer <token>` (401 `unauthorized` otherwise);
the probes and /metrics never do, so orchestrators and Prometheus need no secret. Errors are
problem+json like the proxy's own; the admin API adds 404 "Not Found" `not_found` for an
unknown key or product, and 503 `not_ready` before the first config is loaded.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web

from gateway.config.model import ApiKey, Config, Plan, QuotaRule
from gateway.limits.base import StorageError
from gateway.metrics import render_metrics
from gateway.problems import (
    PROBLEM_CONTENT_TYPE,
    GatewayProblem,
    MethodNotAllowed,
    ServiceUnavailable,
    StorageUnavailable,
    Unauthorized,
)
from gateway.runtime import Runtime

_T = TypeVar("_T")

# None until the worker has loaded its first config.
RuntimeGetter = Callable[[], Runtime | None]
Clock = Callable[[], float]


class NotFound(GatewayProblem):
    status, title, code = 404, "Not Found", "not_found"


class NotReady(ServiceUnavailable):
    code = "not_ready"


@dataclass(frozen=True, slots=True)
class AdminState:
    get_runtime: RuntimeGetter
    token: bytes | None
    clock: Clock


ADMIN_STATE = web.AppKey("admin_state", AdminState)


def build_admin_app(
    get_runtime: RuntimeGetter, *, token: str | None, clock: Clock = time.time
) -> web.Application:
    """The admin application of one worker; `token` is GATEWAY_ADMIN_TOKEN (None: no auth)."""
    if token == "":
        # "Bearer " with nothing after it must not open the admin API.
        raise ValueError("the admin token must not be empty")
    app = web.Application(middlewares=[_problems_and_auth])
    app[ADMIN_STATE] = AdminState(
        get_runtime=get_runtime,
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
    request_id = os.urandom(16).hex()
    return web.Response(
        status=problem.status,
        body=problem.body(request_id),
        headers={
            **problem.headers,
            "Content-Type": PROBLEM_CONTENT_TYPE,
            "X-Request-ID": request_id,
        },
    )


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = render_metrics()
    # The content type carries parameters (version, charset) that `content_type=` would reject.
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    runtime = _loaded_runtime(request)
    try:
        await _within_storage_timeout(runtime, runtime.limiter.ping())
    except StorageUnavailable:
        runtime.storage_ok = False
        raise
    runtime.storage_ok = True
    return web.json_response({"status": "ready"})


async def _get_usage(request: web.Request) -> web.Response:
    state = request.app[ADMIN_STATE]
    runtime = _loaded_runtime(request)
    config = runtime.snapshot.config
    key = _find_key(config, request.match_info["key_name"])
    products: dict[str, Any] = {}
    for product, plan_name in sorted(key.plans.items()):
        plan = config.plans[plan_name]
        quota: dict[str, Any] | None = None
        if plan.quota is not None:
            quota = await _quota_usage(runtime, f"{key.name}:{product}", plan.quota, state.clock)
        products[product] = {"plan": plan_name, "rate": _rate_json(plan), "quota": quota}
    return web.json_response({"key": key.name, "disabled": key.disabled, "products": products})


async def _reset_usage(request: web.Request) -> web.Response:
    runtime = _loaded_runtime(request)
    config = runtime.snapshot.config
    key = _find_key(config, request.match_info["key_name"])
    product = request.match_info["product"]
    plan_name = key.plans.get(product)
    if plan_name is None:
        raise NotFound(f"Key '{key.name}' has no plan for product '{product}'.")
    quota = config.plans[plan_name].quota
    if quota is None:
        raise NotFound(f"Plan '{plan_name}' of product '{product}' has no quota to reset.")
    await _within_storage_timeout(
        runtime, runtime.limiter.reset_quota(f"{key.name}:{product}", quota)
    )
    return web.Response(status=204)


def _loaded_runtime(request: web.Request) -> Runtime:
    runtime = request.app[ADMIN_STATE].get_runtime()
    if runtime is None:
        raise NotReady("No configuration is loaded yet.", headers={"Retry-After": "1"})
    return runtime


def _find_key(config: Config, name: str) -> ApiKey:
    key = config.key_by_name(name)
    if key is None:
        raise NotFound(f"No key is named '{name}'.")
    return key


async def _within_storage_timeout(runtime: Runtime, call: Awaitable[_T]) -> _T:
    try:
        async with asyncio.timeout(runtime.snapshot.config.storage.timeout):
            return await call
    except (StorageError, TimeoutError) as exc:
        raise StorageUnavailable(
            "The rate-limit storage is not answering.", headers={"Retry-After": "1"}
        ) from exc


async def _quota_usage(
    runtime: Runtime, subject: str, quota: QuotaRule, clock: Clock
) -> dict[str, Any]:
    usage = await _within_storage_timeout(runtime, runtime.limiter.usage(subject, quota))
    return {
        "limit": usage.limit,
        "per": quota.per,
        "timezone": quota.timezone.key,
        "used": usage.used,
        "remaining": usage.remaining,
        "reset": _rfc3339(usage.reset_at),
        "reset_seconds": max(0, math.ceil(usage.reset_at - clock())),
    }


def _rate_json(plan: Plan) -> dict[str, Any] | None:
    if plan.rate is None:
        return None
    return {"limit": plan.rate.limit, "per": plan.rate.per, "window_seconds": plan.rate.window}


def _rfc3339(unix_time: float) -> str:
    moment = datetime.fromtimestamp(unix_time, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
