"""The table of Prometheus metric families (README, "Metrics"): each family's name, type, help
and labels written down once, for `gateway.metrics` to expose whichever way it counts, and the
label values the gateway bounds.

Labels are bounded by the config (product, route template, plan, status, code) or by a fixed
set (method, decision, result, operation); no label ever carries an API key or its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

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

REQUEST_LABELS = ("product", "route", "method", "status", "code")


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: its name, type, help and labels, written down once for the
    exposition of one process and for prometheus-client's own (multiprocess) objects."""

    name: str
    kind: Literal["counter", "histogram", "gauge"]
    help: str
    labels: tuple[str, ...] = ()

    def exposition(self) -> CounterMetricFamily | HistogramMetricFamily | GaugeMetricFamily:
        """An empty family for a collector to fill; counters are named without `_total`."""
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=self.labels)
        if self.kind == "histogram":
            return HistogramMetricFamily(self.name, self.help, labels=self.labels)
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)

    def client_metric(self) -> Counter | Histogram | Gauge:
        """prometheus-client's own object for the family, registered nowhere."""
        if self.kind == "counter":
            return Counter(self.name, self.help, self.labels, registry=None)
        if self.kind == "histogram":
            return Histogram(
                self.name, self.help, self.labels, buckets=LATENCY_BUCKETS, registry=None
            )
        return Gauge(self.name, self.help, self.labels, registry=None, multiprocess_mode="livesum")


# Every family the README promises, in the order of the exposition.
REQUESTS = Family(
    "gateway_requests_total",
    "counter",
    "Requests answered, by route, method, status and code.",
    REQUEST_LABELS,
)
REQUEST_DURATION = Family(
    "gateway_request_duration_seconds",
    "histogram",
    "Seconds from the request head to the last byte of the answer.",
    ("product", "route"),
)
UPSTREAM_DURATION = Family(
    "gateway_upstream_duration_seconds",
    "histogram",
    "Seconds from sending a request upstream to receiving its response head.",
    ("product",),
)
LIMIT_DECISIONS = Family(
    "gateway_limit_decisions_total",
    "counter",
    "Rate and quota decisions, by plan and outcome.",
    ("product", "plan", "decision"),
)
STORAGE_ERRORS = Family(
    "gateway_storage_errors_total",
    "counter",
    "Calls to the limit storage that failed or timed out.",
    ("operation",),
)
INFLIGHT_REQUESTS = Family(
    "gateway_inflight_requests", "gauge", "Requests being handled right now."
)
CONFIG_RELOADS = Family(
    "gateway_config_reloads_total", "counter", "Config reloads attempted, by result.", ("result",)
)
WEBSOCKET_BYTES = Family(
    "gateway_websocket_bytes_total",
    "counter",
    "Bytes relayed through WebSockets once they ended, by direction (up: from the client).",
    ("product", "direction"),
)
QUOTA_UNITS = Family(
    "gateway_quota_units_total",
    "counter",
    "Quota units taken at admission, by plan.",
    ("product", "plan"),
)
QUOTA_REFUNDS = Family(
    "gateway_quota_refunds_total",
    "counter",
    "Quota units given back after an outcome the plan refunds, by plan and result.",
    ("product", "plan", "result"),
)
QUOTA_CHARGES = Family(
    "gateway_quota_charges_total",
    "counter",
    "Quota units taken after the answer, its upstream having reported a cost above the units "
    "taken at admission, by plan and result.",
    ("product", "plan", "result"),
)
COST_REPORTS = Family(
    "gateway_cost_reports_total",
    "counter",
    "Answers on routes whose upstream reports the cost (cost_header, cost_field), by what it "
    "said (ok, missing, invalid; cut: the answer broke off before it could).",
    ("product", "route", "result"),
)
FAMILIES: tuple[Family, ...] = (
    REQUESTS,
    REQUEST_DURATION,
    UPSTREAM_DURATION,
    LIMIT_DECISIONS,
    QUOTA_UNITS,
    QUOTA_REFUNDS,
    QUOTA_CHARGES,
    COST_REPORTS,
    STORAGE_ERRORS,
    INFLIGHT_REQUESTS,
    CONFIG_RELOADS,
    WEBSOCKET_BYTES,
)

# Anything else a client may send becomes "OTHER", so the method label stays bounded.
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

LimitDecision = Literal[
    "allowed", "throttled", "quota_exceeded", "storage_error", "local_allowed", "local_throttled"
]
RefundResult = Literal["ok", "error"]
# `cut`: the answer broke off (its client left, its upstream cut it) before the trailer or the
# body that would have said it; apart from `missing`, so that an upstream that stops reporting
# shows apart from clients that stop reading a stream.
CostReport = Literal["ok", "missing", "invalid", "cut"]
