"""What one worker serves from: the config snapshot and the long-lived parts around it.

A `Snapshot` is everything derived from one config that the request path reads (the route
table, the key index, the header names to drop, a destination per product), built once per
config off the hot path. A reload swaps the reference in one assignment, so a request sees
either the old config or the new one, never a mix. The limiter and the upstream pool outlive
snapshots (counters and warm connections survive a reload), as do the local limits of
`storage.on_error: local` and the refunds under way: opened once per worker, closed by
`close_runtime` after the last request has drained (and the last refund is settled).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from gateway import metrics
from gateway.config.model import Config, ServerConfig
from gateway.exchange import GATEWAY_OWNED_HEADERS
from gateway.http.headers import request_drop_set
from gateway.http.server import HttpServer
from gateway.keys import ApiKeyTable, KeyIndex, KeyStore, create_key_store
from gateway.limits import create_limiter
from gateway.limits.base import Limiter
from gateway.limits.memory import MemoryLimiter
from gateway.limits.metering import Settlements
from gateway.pipeline import answer_request_error, handle_request
from gateway.proxy import Destination, UpstreamPool
from gateway.routing import RouteTable
from gateway.tasks import finish_within


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    routes: RouteTable
    keys: KeyIndex
    key_header: bytes  # auth.header, lower-cased, as the request's raw header lines hold it
    request_drop: frozenset[bytes]  # request headers never forwarded: hop-by-hop, the key's
    # The same and Accept-Encoding, for a route whose answer's body is read for its cost: the
    # upstream then sends it as it is, for the gateway to read (README, "Metering").
    request_drop_for_body: frozenset[bytes]
    destinations: Mapping[str, Destination]  # by product name


@dataclass(slots=True)
class Runtime:
    snapshot: Snapshot
    limiter: Limiter
    upstreams: UpstreamPool
    key_store: KeyStore  # the API keys, followed from the storage; outlives snapshots
    # In-process limits for storage.on_error: local, and the refunds and charges under way;
    # both outlive snapshots, like the limiter (README, "Metering").
    local_limiter: Limiter = field(default_factory=lambda: MemoryLimiter(keep_history=False))
    settlements: Settlements = field(
        default_factory=lambda: Settlements(metrics.count_refund, metrics.count_charge)
    )
    # Whether each key index leaves the principals it makes out of full collections
    # (`freeze_made_principals`).
    freezes_principals: bool = False

    def apply(self, config: Config, keys: KeyIndex | None = None) -> None:
        """Serve `config` from now on (called on the event loop: the clients need it).

        `keys`: the config's key index when it was built beforehand, off the event loop
        (`index_keys`; for 100,000 keys it is tens of milliseconds of work)."""
        if keys is None:
            keys = self.index_keys(config)
        self.snapshot = build_snapshot(config, self.upstreams, self.key_store.table, keys)
        _show_key_store(self.key_store, config, self.snapshot)

    def index_keys(self, config: Config) -> KeyIndex:
        """The key index of `config`; it only reads, so a thread may build it."""
        return KeyIndex(
            config.keys,
            config.plans,
            self.key_store.table,
            freeze_made=self.freezes_principals,
        )

    def freeze_made_principals(self) -> None:
        """From now on, the key indexes leave the principals they make out of full collections
        (`KeyIndex.freeze_made`): for a gateway worker, which runs the process's collector; not
        in a test's process, whose own live objects a freeze would keep from it for good."""
        self.freezes_principals = True
        self.snapshot.keys.freeze_made = True


def build_snapshot(
    config: Config,
    upstreams: UpstreamPool,
    api_keys: ApiKeyTable,
    keys: KeyIndex | None = None,
) -> Snapshot:
    """`api_keys` is the key store's table, shared by every snapshot of the process. The
    upstreams' clients no longer named are retired (`UpstreamPool.keep_only`)."""
    destinations = {
        name: upstreams.destination(product) for name, product in config.products.items()
    }
    upstreams.keep_only(destinations.values())
    drop = request_drop_set(config.auth.header)
    return Snapshot(
        config=config,
        routes=RouteTable(config.products.values()),
        keys=keys if keys is not None else KeyIndex(config.keys, config.plans, api_keys),
        key_header=config.auth.header.lower().encode("latin-1"),
        request_drop=drop,
        request_drop_for_body=drop | {b"accept-encoding"},
        destinations=destinations,
    )


def _show_key_store(key_store: KeyStore, config: Config, snapshot: Snapshot) -> None:
    """What the API keys the store brings are checked against, for each snapshot served: the
    file's secrets (a clash is the file key's, and told) and the products and plans (keys
    naming others are told)."""
    key_store.secret_clashes = snapshot.keys.secret_clashes
    key_store.config_names = (config.products, config.plans)


def build_runtime(config: Config, limiter: Limiter | None = None) -> Runtime:
    """The runtime of one worker; `await runtime.key_store.start()` before serving."""
    upstreams = UpstreamPool()
    storage = config.storage
    count = metrics.count_storage_error
    # One set of Redis clients (and one Sentinel watch) per worker, for the key store and the
    # limiter alike; each closes its share.
    redis = None
    if not storage.is_memory:
        # Imported here so that a memory-only gateway never loads the Redis client.
        from gateway.limits.redis_clients import open_storage_redis

        redis = open_storage_redis(storage.url, storage.timeout)
    key_store = create_key_store(storage, count, redis)
    snapshot = build_snapshot(config, upstreams, key_store.table)
    _show_key_store(key_store, config, snapshot)
    return Runtime(
        snapshot=snapshot,
        limiter=limiter or create_limiter(storage, count, redis),
        upstreams=upstreams,
        key_store=key_store,
    )


# As the HTTP layer compares header names: lower-case bytes.
_INTERIM_DROP = frozenset(name.lower().encode() for name in GATEWAY_OWNED_HEADERS)


def build_proxy_server(runtime: Runtime, server: ServerConfig) -> HttpServer:
    """The protocol factory of the proxy port; every request goes through the pipeline."""
    return HttpServer(
        functools.partial(handle_request, runtime),
        on_request_error=answer_request_error,
        head_timeout=server.timeouts.client_header,
        keepalive_timeout=server.timeouts.keepalive,
        tls=None if server.tls is None else server.tls.context,
        interim_drop=_INTERIM_DROP,
        send_timeout=lambda: runtime.snapshot.config.server.timeouts.client_body,
    )


async def close_runtime(runtime: Runtime) -> None:
    """Close the runtime's parts in turn. A step that fails is named in a warning and the next
    still runs: the key store and the limiter share the storage's clients, which the last of
    them closes. Each step bounds its own waits; the caller bounds them all (CLOSE_TIMEOUT)."""
    steps: tuple[tuple[Callable[[], Awaitable[object]], str], ...] = (
        (runtime.upstreams.close, "closing the upstream connections"),
        (runtime.key_store.close, "closing the API key store"),
        (runtime.settlements.drain, "settling the refunds and charges under way"),
        (runtime.limiter.close, "closing the limiter"),
        (runtime.local_limiter.close, "closing the local limiter"),
    )
    for close, what in steps:
        await finish_within(close(), None, what)
