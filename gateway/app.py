"""Builds the proxy application of one worker and the runtime it serves from.

The request path itself is `pipeline.REQUEST_PATH`; this module only wires it to aiohttp and
owns the lifetime of the long-lived resources (limit storage, upstream pools) through
`cleanup_ctx`, so they are opened once per worker and closed on shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway import metrics
from gateway.auth import KeyIndex
from gateway.config.model import Config
from gateway.limits import create_limiter
from gateway.limits.base import Limiter
from gateway.pipeline import RUNTIME, handle_request
from gateway.proxy import UpstreamPool
from gateway.routing import RouteTable
from gateway.runtime import Runtime, Snapshot


def build_snapshot(config: Config) -> Snapshot:
    """Everything derived from one config that the hot path reads; built off the hot path."""
    return Snapshot(
        config=config,
        routes=RouteTable(config.products.values()),
        keys=KeyIndex(config.keys, config.plans),
    )


def build_runtime(config: Config, limiter: Limiter | None = None) -> Runtime:
    return Runtime(
        snapshot=build_snapshot(config),
        limiter=limiter
        or create_limiter(config.storage, on_storage_error=metrics.count_storage_error),
        upstreams=UpstreamPool(config.products),
    )


def build_proxy_app(runtime: Runtime) -> web.Application:
    app = web.Application(handler_args={"access_log": None})
    app[RUNTIME] = runtime
    app.cleanup_ctx.append(_runtime_resources)
    # One catch-all route: the gateway's own route table (routing.py) decides, so that a
    # reload can replace it without touching aiohttp's router.
    app.router.add_route("*", "/{tail:.*}", handle_request)
    return app


async def _runtime_resources(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    yield
    await runtime.upstreams.close()
    await runtime.limiter.close()
