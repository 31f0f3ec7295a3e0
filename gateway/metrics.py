"""Every Prometheus metric (README, "Metrics"), and how they are summed over worker processes.

With one process the metrics are plain numbers of this process (`GatewayMetrics`), exposed by a
collector in prometheus-client's default registry. With several workers the master calls
`prepare_multiprocess_dir` before forking: from then on prometheus-client's own metric objects
(`MultiprocessMetrics`) keep every value in a per-process mmap file under
PROMETHEUS_MULTIPROC_DIR, and `render_metrics` (in any worker) sums the files of all of them, so
a scrape sees the whole gateway whichever worker answers it.

prometheus-client chooses between in-memory and mmap-backed values when it is imported, from
that environment variable. The master has usually imported this module before it knows how many
workers it will fork, so `prepare_multiprocess_dir` swaps the value class and rebuilds the metric
objects; workers forked afterwards inherit the multiprocess ones.

The families themselves, and the label values they allow, are in `gateway.metric_families`;
their names are reachable from here too.
"""

from __future__ import annotations

import glob
import os
import tempfile
from bisect import bisect_left
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from gateway.metric_families import (
    CONFIG_RELOADS,
    COST_REPORTS,
    FAMILIES,
    INFLIGHT_REQUESTS,
    LATENCY_BUCKETS,
    LIMIT_DECISIONS,
    QUOTA_CHARGES,
    QUOTA_REFUNDS,
    QUOTA_UNITS,
    REQUEST_DURATION,
    REQUEST_LABELS,
    REQUESTS,
    STANDARD_METHODS,
    STORAGE_ERRORS,
    UPSTREAM_DURATION,
    WEBSOCKET_BYTES,
    CostReport,
    Family,
    LimitDecision,
    RefundResult,
)
from gateway.metrics_folders import FOLDER_PREFIX, hold_owner_lock, remove_abandoned_folders
from gateway.record import RequestRecord
from gateway.worker_stats import WorkerStats

__all__ = [
    "CONFIG_RELOADS",
    "COST_REPORTS",
    "FAMILIES",
    "INFLIGHT",
    "INFLIGHT_REQUESTS",
    "LATENCY_BUCKETS",
    "LIMIT_DECISIONS",
    "MULTIPROC_ENV",
    "QUOTA_CHARGES",
    "QUOTA_REFUNDS",
    "QUOTA_UNITS",
    "REQUESTS",
    "REQUEST_DURATION",
    "REQUEST_LABELS",
    "STANDARD_METHODS",
    "STORAGE_ERRORS",
    "UPSTREAM_DURATION",
    "WEBSOCKET_BYTES",
    "CostReport",
    "Family",
    "GatewayMetrics",
    "LimitDecision",
    "MultiprocessMetrics",
    "RefundResult",
    "count_charge",
    "count_cost_report",
    "count_refund",
    "count_reload",
    "count_storage_error",
    "count_websocket_bytes",
    "mark_worker_dead",
    "multiprocess_dir",
    "observe_limit_decision",
    "observe_request",
    "observe_units",
    "prepare_multiprocess_dir",
    "render_metrics",
    "track_inflight",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# The `le` label of each bucket, as prometheus-client writes it.
_LE = tuple(
    floatToGoString(bound)  # type: ignore[no-untyped-call]
    for bound in (*LATENCY_BUCKETS, float("inf"))
)
# Index of the bucket an observation falls in: the first bound it does not exceed, or +Inf.
# (A NaN would land in the first bucket, where prometheus-client drops it; durations from the
# loop's clock are never NaN.)
_bucket_of = bisect_left

# `_created` series double the series count and do not exist in multiprocess mode; leaving them
# out keeps one-worker and many-worker scrapes alike.
disable_created_metrics()  # type: ignore[no-untyped-call]


class GatewayMetrics:
    """The metrics of one process, kept as plain numbers and turned into families on a scrape.

    prometheus-client's `inc` and `observe` take a lock and go through several method layers
    per call, 6-10 µs per request in all under load. In one process nothing else writes these
    numbers, and a scrape runs on the event loop between requests, so plain counters give the
    same exposition (same families, order, labels, buckets, `_sum`/`_count`, no `_created`)
    for a fraction of that. The rare storage-error and reload counters stay prometheus-client
    objects; this collector yields them in their place.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry
        self.storage_errors = cast(Counter, STORAGE_ERRORS.client_metric())
        self.config_reloads = _reload_counter()
        self.websocket_bytes = cast(Counter, WEBSOCKET_BYTES.client_metric())
        self.quota_refunds = cast(Counter, QUOTA_REFUNDS.client_metric())
        self.quota_charges = cast(Counter, QUOTA_CHARGES.client_metric())
        self.cost_reports = cast(Counter, COST_REPORTS.client_metric())
        self._units: dict[tuple[str, str], list[int]] = {}
        self.inflight = 0
        # One entry per label tuple of gateway_requests_total; each holds the histograms its
        # request also feeds, so a request costs one dict lookup.
        self._requests: dict[tuple[str, str, str, int, str], _RequestSeries] = {}
        self._durations: dict[tuple[str, str], _Histogram] = {}
        self._upstreams: dict[str, _Histogram] = {}
        self._decisions: dict[tuple[str, str, str], list[int]] = {}
        if registry is not None:
            registry.register(self)

    def observe_request(self, record: RequestRecord) -> None:
        method = record.method
        if method not in STANDARD_METHODS:
            method = "OTHER"
        key = (record.product, record.route, method, record.status, record.code)
        series = self._requests.get(key)
        if series is None:
            series = self._new_series(key)
        series.count += 1
        duration = record.duration
        histogram = series.duration
        histogram.counts[_bucket_of(LATENCY_BUCKETS, duration)] += 1
        histogram.sum += duration
        duration_upstream = record.upstream_duration
        if duration_upstream is not None:
            histogram_upstream = series.upstream
            if histogram_upstream is None:
                histogram_upstream = series.upstream = self._upstreams.setdefault(
                    record.product, _Histogram()
                )
            histogram_upstream.counts[_bucket_of(LATENCY_BUCKETS, duration_upstream)] += 1
            histogram_upstream.sum += duration_upstream

    def observe_limit_decision(self, product: str, plan: str, decision: LimitDecision) -> None:
        key = (product, plan, decision)
        count = self._decisions.get(key)
        if count is None:
            count = self._decisions[key] = [0]
        count[0] += 1

    def inc_inflight(self) -> None:
        self.inflight += 1

    def dec_inflight(self) -> None:
        self.inflight -= 1

    def describe(self) -> Iterator[Metric]:
        """The families without samples: what the registry checks for clashing names."""
        for family in FAMILIES:
            yield family.exposition()

    def collect(self) -> Iterator[Metric]:
        requests = cast(CounterMetricFamily, REQUESTS.exposition())
        durations = cast(HistogramMetricFamily, REQUEST_DURATION.exposition())
        upstreams = cast(HistogramMetricFamily, UPSTREAM_DURATION.exposition())
        decisions = cast(CounterMetricFamily, LIMIT_DECISIONS.exposition())
        inflight = cast(GaugeMetricFamily, INFLIGHT_REQUESTS.exposition())
        units = cast(CounterMetricFamily, QUOTA_UNITS.exposition())
        # Copies, so that a collect from another thread could not see a dict change size.
        for (product, route, method, status, code), series in list(self._requests.items()):
            requests.add_metric((product, route, method, str(status), code), float(series.count))
        for labels, histogram in list(self._durations.items()):
            durations.add_metric(labels, histogram.cumulative(), histogram.sum)
        for product, histogram in list(self._upstreams.items()):
            upstreams.add_metric((product,), histogram.cumulative(), histogram.sum)
        for decision, count in list(self._decisions.items()):
            decisions.add_metric(decision, float(count[0]))
        inflight.add_metric((), float(self.inflight))
        for labels, count in list(self._units.items()):
            units.add_metric(labels, float(count[0]))
        yield requests
        yield durations
        yield upstreams
        yield decisions
        yield units
        yield from self.quota_refunds.collect()
        yield from self.quota_charges.collect()
        yield from self.cost_reports.collect()
        yield from self.storage_errors.collect()
        yield inflight
        yield from self.config_reloads.collect()
        yield from self.websocket_bytes.collect()

    def observe_units(self, product: str, plan: str, units: int) -> None:
        key = (product, plan)
        count = self._units.get(key)
        if count is None:
            count = self._units[key] = [0]
        count[0] += units

    def unregister(self) -> None:
        if self.registry is None:
            return
        self.registry.unregister(self)
        self.registry = None

    def _new_series(self, key: tuple[str, str, str, int, str]) -> _RequestSeries:
        product, route = key[0], key[1]
        duration = self._durations.get((product, route))
        if duration is None:
            duration = self._durations[(product, route)] = _Histogram()
        series = self._requests[key] = _RequestSeries(duration, self._upstreams.get(product))
        return series


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, not cumulative; +Inf last
        self.sum = 0.0

    def cumulative(self) -> list[tuple[str, float]]:
        buckets: list[tuple[str, float]] = []
        total = 0.0
        for le, count in zip(_LE, self.counts, strict=True):
            total += count
            buckets.append((le, total))
        return buckets


class _RequestSeries:
    __slots__ = ("count", "duration", "upstream")

    def __init__(self, duration: _Histogram, upstream: _Histogram | None) -> None:
        self.count = 0
        self.duration = duration
        self.upstream = upstream  # set on the first proxied request: no upstream, no series


class MultiprocessMetrics:
    """The metric families as prometheus-client objects, whose values live in the mmap files
    of PROMETHEUS_MULTIPROC_DIR, and per-label-tuple caches of their children.

    `.labels()` validates and hashes its arguments under a lock on every call; a dict lookup on
    a tuple is what the request path can afford.
    """

    def __init__(self) -> None:
        # In multiprocess mode nothing is registered: the scrape reads the mmap files.
        self.requests = cast(Counter, REQUESTS.client_metric())
        self.request_duration = cast(Histogram, REQUEST_DURATION.client_metric())
        self.upstream_duration = cast(Histogram, UPSTREAM_DURATION.client_metric())
        self.limit_decisions = cast(Counter, LIMIT_DECISIONS.client_metric())
        self.storage_errors = cast(Counter, STORAGE_ERRORS.client_metric())
        self.inflight = cast(Gauge, INFLIGHT_REQUESTS.client_metric())
        self.config_reloads = _reload_counter()
        self.websocket_bytes = cast(Counter, WEBSOCKET_BYTES.client_metric())
        self.quota_units = cast(Counter, QUOTA_UNITS.client_metric())
        self.quota_refunds = cast(Counter, QUOTA_REFUNDS.client_metric())
        self.quota_charges = cast(Counter, QUOTA_CHARGES.client_metric())
        self.cost_reports = cast(Counter, COST_REPORTS.client_metric())
        self._units: dict[tuple[str, str], Counter] = {}
        self._requests: dict[tuple[str, str, str, int, str], Counter] = {}
        self._durations: dict[tuple[str, str], Histogram] = {}
        self._upstreams: dict[str, Histogram] = {}
        self._decisions: dict[tuple[str, str, str], Counter] = {}
        self.inc_inflight = self.inflight.inc
        self.dec_inflight = self.inflight.dec

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

    def observe_units(self, product: str, plan: str, units: int) -> None:
        key = (product, plan)
        counter = self._units.get(key)
        if counter is None:
            counter = self._units[key] = self.quota_units.labels(product, plan)
        counter.inc(units)

    def unregister(self) -> None:
        return None  # never registered


def _reload_counter() -> Counter:
    """gateway_config_reloads_total, both results shown from the start (at 0): an alert on
    `increase(...{result="error"}[5m])` needs the series before the first failure."""
    counter = cast(Counter, CONFIG_RELOADS.client_metric())
    for result in ("ok", "error"):
        counter.labels(result)
    return counter


def _multiprocess_dir_from_env() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


_multiprocess_dir: str | None = _multiprocess_dir_from_env()
_current: GatewayMetrics | MultiprocessMetrics = (
    MultiprocessMetrics() if _multiprocess_dir else GatewayMetrics(REGISTRY)
)


def multiprocess_dir() -> str | None:
    return _multiprocess_dir


def prepare_multiprocess_dir(path: str | None = None, *, within: str | None = None) -> str:
    """Switch this process to multiprocess metrics; call in the master before forking workers.

    `path`: the folder to use; files an earlier run left there are removed, their counts
    belonging to processes that no longer exist. Without it, a new folder of this process's
    own, made in `within` (default: the system's temporary folder), which no other process
    reads or empties. Returns the folder in use.
    """
    global _current, _multiprocess_dir
    if path is None:
        if within is not None:
            os.makedirs(within, exist_ok=True)
        remove_abandoned_folders(within or tempfile.gettempdir())
        directory = tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=within)
        hold_owner_lock(directory)
    else:
        directory = path
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(directory, "*.db")):
            os.remove(stale)
    os.environ[MULTIPROC_ENV] = directory
    # A fresh value class also drops file handles opened in another folder by an earlier call.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _current.unregister()
    _current = MultiprocessMetrics()
    INFLIGHT.follow(_current)
    _multiprocess_dir = directory
    return directory


def mark_worker_dead(pid: int) -> None:
    """Drop an exited worker from the in-flight gauge; its counters keep counting in the sums."""
    if _multiprocess_dir is not None:
        multiprocess.mark_process_dead(pid, _multiprocess_dir)  # type: ignore[no-untyped-call]


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus text exposition of every worker's metrics, and its content type."""
    workers = CollectorRegistry()
    workers.register(WorkerStats(_multiprocess_dir))
    if _multiprocess_dir is None:
        return generate_latest(REGISTRY) + generate_latest(workers), CONTENT_TYPE_PLAIN_0_0_4
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, _multiprocess_dir)  # type: ignore[no-untyped-call]
    return generate_latest(registry) + generate_latest(workers), CONTENT_TYPE_PLAIN_0_0_4


def observe_request(record: RequestRecord) -> None:
    """Count one answered request: requests_total, its duration, and the upstream's if proxied."""
    _current.observe_request(record)


def observe_limit_decision(product: str, plan: str, decision: LimitDecision) -> None:
    _current.observe_limit_decision(product, plan, decision)


def observe_units(product: str, plan: str, units: int) -> None:
    """Quota units taken by one admission."""
    _current.observe_units(product, plan, units)


def count_refund(product: str, plan: str, result: RefundResult, units: int) -> None:
    """Units of a refund: given back (`ok`, even when the counter was gone) or not (`error`)."""
    _current.quota_refunds.labels(product, plan, result).inc(units)


def count_charge(product: str, plan: str, result: RefundResult, units: int) -> None:
    """Units taken after an answer whose upstream reported a higher cost: taken (`ok`, even
    when the counter was gone) or not (`error`)."""
    _current.quota_charges.labels(product, plan, result).inc(units)


def count_cost_report(product: str, route: str, result: CostReport) -> None:
    """What an answer on a route with a cost_header or cost_field said of its cost."""
    _current.cost_reports.labels(product, route, result).inc()


def count_storage_error(operation: str) -> None:
    """`operation` is a fixed word naming the storage call (README, "Metrics"): hit, refund,
    charge, register, credit, usage, history, reset, ping, and the key store's key_write,
    key_read, key_version, key_load, key_subscribe."""
    _current.storage_errors.labels(operation).inc()


def count_reload(ok: bool) -> None:
    _current.config_reloads.labels("ok" if ok else "error").inc()


def count_websocket_bytes(product: str, up: int, down: int) -> None:
    """A WebSocket that ended: `up` bytes came from its client, `down` from its upstream."""
    counter = _current.websocket_bytes
    counter.labels(product, "up").inc(up)
    counter.labels(product, "down").inc(down)


class _Inflight:
    """`INFLIGHT.inc()` / `.dec()` on whichever gauge is current, so callers may hold it."""

    __slots__ = ("dec", "inc")

    def __init__(self) -> None:
        self.follow(_current)

    def follow(self, current: GatewayMetrics | MultiprocessMetrics) -> None:
        # The current object's own methods, bound once: twice per request, one call each.
        self.inc: Callable[[], None] = current.inc_inflight
        self.dec: Callable[[], None] = current.dec_inflight


INFLIGHT = _Inflight()


@contextmanager
def track_inflight() -> Iterator[None]:
    INFLIGHT.inc()
    try:
        yield
    finally:
        INFLIGHT.dec()
