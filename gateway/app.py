"""Builds the proxy server of one worker and the runtime it serves from.

The request path itself is `pipeline.REQUEST_PATH`; this module only wires it to the proxy
port's server (http_server.py) and owns the lifetime of the long-lived resources (limit
storage, upstream pools): opened once per worker, closed by `close_runtime` after the last
request has drained.
"""

from __future__ import annotations

import functools

from gateway import metrics
from gateway.auth import KeyIndex
from gateway.config.model import Config, Timeouts
from gateway.http.server import HttpServer
from gateway.limits import create_limiter
from gateway.limits.base import Limiter
from gateway.pipeline import handle_request
from gateway.proxy import UpstreamPool
from gateway.routing import RouteTable
from gateway.runtime import Runtime, Snapshot


def build_snapshot(config: Config) -> Snapshot:
    """Everything derived from one config that the hot path reads; built off the hot path."""
    return Snapshot(
        config=config,
        routes=RouteTable(config.products.values()),
        keys=KeyIndex(config.keys, config.plans),
        key_header=config.auth.header.lower().encode("latin-1"),
    )


def build_runtime(config: Config, limiter: Limiter | None = None) -> Runtime:
    return Runtime(
        snapshot=build_snapshot(config),
        limiter=limiter
        or create_limiter(config.storage, on_storage_error=metrics.count_storage_error),
        upstreams=UpstreamPool(config.products),
    )


def build_proxy_server(runtime: Runtime, timeouts: Timeouts) -> HttpServer:
    """The protocol factory of the proxy port; every request goes through `handle_request`."""
    return HttpServer(
        functools.partial(handle_request, runtime),
        head_timeout=timeouts.client_header,
        keepalive_timeout=timeouts.keepalive,
    )


async def close_runtime(runtime: Runtime) -> None:
    await runtime.upstreams.close()
    await runtime.limiter.close()
