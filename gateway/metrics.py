"""Every Prometheus metric of the contract's §6, and how they are summed over worker processes.

With one process the metrics live in prometheus-client's default registry. With several workers
the master calls `prepare_multiprocess_dir` before forking: from then on every value is kept in a
per-process mmap file under PROMETHEUS_MULTIPROC_DIR, and `render_metrics` (in any worker) sums
the files of all of them, so a scrape sees the whole gateway whichever worker answers it.

prometheus-client chooses between in-memory and mmap-backed values when it is imported, from
that environment variable. The master has usually imported this module before it knows how many
workers it will fork, so `prepare_multiprocess_dir` swaps the value class and rebuilds the metric
objects; workers forked afterwards inherit the multiprocess ones.

Labels are bounded by the config (product, route template, plan, status, code) or by a fixed
set (method, decision, result, operation); no label ever carries an API key or its name.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)

from gateway.record import RequestRecord

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# From a cache-hit-fast upstream (0.5 ms) to the longest upstream timeout one would configure.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# Anything else a client may send becomes "OTHER", so the method label stays bounded.
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

LimitDecision = Literal["allowed", "throttled", "quota_exceeded", "storage_error"]

# `_created` series double the series count and do not exist in multiprocess mode; leaving them
# out keeps one-worker and many-worker scrapes alike.
disable_created_metrics()  # type: ignore[no-untyped-call]


class GatewayMetrics:
    """The metric families, and per-label-tuple caches of their children.

    `.labels()` validates and hashes its arguments under a lock on every call; a dict lookup on
    a tuple is what the request path can afford.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry
        self.requests = Counter(
            "gateway_requests_total",
            "Requests answered, by route, method, status and contract code.",
            ("product", "route", "method", "status", "code"),
            registry=registry,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Seconds from the request head to the last byte of the answer.",
            ("product", "route"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Seconds from sending a request upstream to receiving its response head.",
            ("product",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.limit_decisions = Counter(
            "gateway_limit_decisions_total",
            "Rate and quota decisions, by plan and outcome.",
            ("product", "plan", "decision"),
            registry=registry,
        )
        self.storage_errors = Counter(
            "gateway_storage_errors_total",
            "Calls to the limit storage that failed or timed out.",
            ("operation",),
            registry=registry,
        )
        self.inflight = Gauge(
            "gateway_inflight_requests",
            "Requests being handled right now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.config_reloads = Counter(
            "gateway_config_reloads_total",
            "Config reloads attempted, by result.",
            ("result",),
            registry=registry,
        )
        self._requests: dict[tuple[str, str, str, int, str], Counter] = {}
        self._durations: dict[tuple[str, str], Histogram] = {}
        self._upstreams: dict[str, Histogram] = {}
        self._decisions: dict[tuple[str, str, str], Counter] = {}

    def observe_request(self, record: RequestRecord) -> None:
        method = record.method if record.method in STANDARD_METHODS else "OTHER"
        product, route = record.product, record.route
        key = (product, route, method, record.status, record.code)
        counter = self._requests.get(key)
        if counter is None:
            counter = self.requests.labels(product, route, method, str(record.status), record.code)
            self._requests[key] = counter
        counter.inc()

        duration = self._durations.get((product, route))
        if duration is None:
            duration = self.request_duration.labels(product, route)
            self._durations[(product, route)] = duration
        duration.observe(record.duration)

        if record.upstream_duration is not None:
            upstream = self._upstreams.get(product)
            if upstream is None:
                upstream = self.upstream_duration.labels(product)
                self._upstreams[product] = upstream
            upstream.observe(record.upstream_duration)

    def observe_limit_decision(self, product: str, plan: str, decision: LimitDecision) -> None:
        key = (product, plan, decision)
        counter = self._decisions.get(key)
        if counter is None:
            counter = self.limit_decisions.labels(product, plan, decision)
            self._decisions[key] = counter
        counter.inc()

    def unregister(self) -> None:
        if self.registry is None:
            return
        for collector in (
            self.requests,
            self.request_duration,
            self.upstream_duration,
            self.limit_decisions,
            self.storage_errors,
            self.inflight,
            self.config_reloads,
        ):
            self.registry.unregister(collector)
        self.registry = None


def _multiprocess_dir_from_env() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


_multiprocess_dir: str | None = _multiprocess_dir_from_env()
# In multiprocess mode nothing is registered: the scrape reads the mmap files, not objects.
_current = GatewayMetrics(None if _multiprocess_dir else REGISTRY)


def current() -> GatewayMetrics:
    """The metric objects in use (they are replaced once, by `prepare_multiprocess_dir`)."""
    return _current


def multiprocess_dir() -> str | None:
    return _multiprocess_dir


def prepare_multiprocess_dir(path: str | None = None) -> str:
    """Switch this process to multiprocess metrics; call in the master before forking workers.

    `path` defaults to an existing PROMETHEUS_MULTIPROC_DIR, else a new temporary folder. Files
    left by an earlier run are removed: their counts belong to processes that no longer exist.
    Returns the folder in use.
    """
    global _current, _multiprocess_dir
    directory = path or _multiprocess_dir_from_env() or tempfile.mkdtemp(prefix="gateway-metrics-")
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(os.path.join(directory, "*.db")):
        os.remove(stale)
    os.environ[MULTIPROC_ENV] = directory
    # A fresh value class also drops file handles opened in another folder by an earlier call.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _current.unregister()
    _current = GatewayMetrics(None)
    _multiprocess_dir = directory
    return directory


def mark_worker_dead(pid: int) -> None:
    """Drop an exited worker from the in-flight gauge; its counters keep counting in the sums."""
    if _multiprocess_dir is not None:
        multiprocess.mark_process_dead(pid, _multiprocess_dir)  # type: ignore[no-untyped-call]


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus text exposition of every worker's metrics, and its content type."""
    if _multiprocess_dir is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_PLAIN_0_0_4
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, _multiprocess_dir)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


def observe_request(record: RequestRecord) -> None:
    """Count one answered request: requests_total, its duration, and the upstream's if proxied."""
    _current.observe_request(record)


def observe_limit_decision(product: str, plan: str, decision: LimitDecision) -> None:
    _current.observe_limit_decision(product, plan, decision)


def count_storage_error(operation: str) -> None:
    """`operation` is a fixed word naming the storage call: hit, usage, reset_quota, ping."""
    _current.storage_errors.labels(operation).inc()


def count_reload(ok: bool) -> None:
    _current.config_reloads.labels("ok" if ok else "error").inc()


class _Inflight:
    """`INFLIGHT.inc()` / `.dec()` on whichever gauge is current, so callers may hold it."""

    __slots__ = ()

    def inc(self) -> None:
        _current.inflight.inc()

    def dec(self) -> None:
        _current.inflight.dec()


INFLIGHT = _Inflight()


@contextmanager
def track_inflight() -> Iterator[None]:
    _current.inflight.inc()
    try:
        yield
    finally:
        _current.inflight.dec()
