"""The metrics (README, "Metrics"): names, types, labels, values, and sums over worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.record import RequestRecord
from tests.support.paths import REPO_ROOT

# The README's table: name -> (type, labels).
README_METRICS = {
    "gateway_requests": ("counter", {"product", "route", "method", "status", "code"}),
    "gateway_request_duration_seconds": ("histogram", {"product", "route"}),
    "gateway_upstream_duration_seconds": ("histogram", {"product"}),
    "gateway_limit_decisions": ("counter", {"product", "plan", "decision"}),
    "gateway_storage_errors": ("counter", {"operation"}),
    "gateway_inflight_requests": ("gauge", set()),
    "gateway_config_reloads": ("counter", {"result"}),
    "gateway_websocket_bytes": ("counter", {"product", "direction"}),
    "gateway_quota_units": ("counter", {"product", "plan"}),
    "gateway_quota_refunds": ("counter", {"product", "plan", "result"}),
    "gateway_quota_charges": ("counter", {"product", "plan", "result"}),
    "gateway_cost_reports": ("counter", {"product", "route", "result"}),
}
ROUTE = "/soccer/v4/{lang}/info.json"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def record(
    *,
    method: str = "GET",
    status: int = 200,
    code: str = "upstream",
    duration: float = 0.02,
    upstream: float | None = 0.01,
    product: str = "soccer",
    route: str = ROUTE,
) -> RequestRecord:
    return RequestRecord(
        request_id="r",
        method=method,
        path="/soccer/v4/en/info.json",
        start=0.0,
        status=status,
        code=code,
        product=product,
        route=route,
        key_name="acme-trial",
        plan="trial",
        duration=duration,
        upstream_duration=upstream,
    )


def test_every_metric_of_the_readme_with_its_type_and_labels() -> None:
    registry = CollectorRegistry()
    gateway_metrics = metrics.GatewayMetrics(registry)
    gateway_metrics.observe_request(record())
    gateway_metrics.observe_limit_decision("soccer", "trial", "allowed")
    gateway_metrics.storage_errors.labels("hit").inc()
    gateway_metrics.config_reloads.labels("ok").inc()
    gateway_metrics.websocket_bytes.labels("soccer", "up").inc(10)
    gateway_metrics.observe_units("soccer", "trial", 10)
    gateway_metrics.quota_refunds.labels("soccer", "trial", "ok").inc(10)
    gateway_metrics.quota_charges.labels("soccer", "trial", "ok").inc(10)
    gateway_metrics.cost_reports.labels("soccer", ROUTE, "ok").inc()

    families = {family.name: family for family in registry.collect()}

    assert set(families) == set(README_METRICS)
    for name, (kind, labels) in README_METRICS.items():
        family = families[name]
        assert family.type == kind, name
        sample_labels = {label for sample in family.samples for label in sample.labels}
        assert sample_labels - {"le"} == labels, name


def test_reload_results_are_shown_at_zero_before_any_reload() -> None:
    registry = CollectorRegistry()
    metrics.GatewayMetrics(registry)
    text = generate_latest(registry).decode()
    assert 'gateway_config_reloads_total{result="ok"} 0.0' in text
    assert 'gateway_config_reloads_total{result="error"} 0.0' in text


def test_observed_requests_show_up_in_counts_durations_and_buckets() -> None:
    registry = CollectorRegistry()
    gateway_metrics = metrics.GatewayMetrics(registry)
    for _ in range(3):
        gateway_metrics.observe_request(record(duration=0.0004, upstream=0.0003))
    gateway_metrics.observe_request(record(status=429, code="throttled", upstream=None))
    gateway_metrics.observe_request(
        record(method="PROPFIND", status=405, code="method_not_allowed", upstream=None)
    )
    gateway_metrics.observe_request(
        record(status=404, code="invalid_route", product="", route="", upstream=None)
    )

    text = generate_latest(registry).decode()

    ok = {"product": "soccer", "route": ROUTE, "method": "GET", "status": "200"}
    assert value(text, "gateway_requests_total", **ok, code="upstream") == 3
    assert value(text, "gateway_requests_total", **ok | {"status": "429"}, code="throttled") == 1
    other = {"product": "soccer", "route": ROUTE, "method": "OTHER", "status": "405"}
    assert value(text, "gateway_requests_total", **other, code="method_not_allowed") == 1
    unrouted = {"product": "", "route": "", "method": "GET", "status": "404"}
    assert value(text, "gateway_requests_total", **unrouted, code="invalid_route") == 1

    per_route = {"product": "soccer", "route": ROUTE}
    assert value(text, "gateway_request_duration_seconds_count", **per_route) == 5
    assert value(text, "gateway_request_duration_seconds_bucket", **per_route, le="0.0005") == 3
    assert value(text, "gateway_request_duration_seconds_bucket", **per_route, le="+Inf") == 5
    # Only proxied requests have an upstream duration.
    assert value(text, "gateway_upstream_duration_seconds_count", product="soccer") == 3
    assert (
        value(text, "gateway_upstream_duration_seconds_bucket", product="soccer", le="0.0005") == 3
    )
    # The key's name is a log field, never a label.
    assert "acme-trial" not in text
    assert "_created" not in text


def test_buckets_span_half_a_millisecond_to_thirty_seconds() -> None:
    assert metrics.LATENCY_BUCKETS[0] == 0.0005
    assert metrics.LATENCY_BUCKETS[-1] == 30.0
    assert list(metrics.LATENCY_BUCKETS) == sorted(set(metrics.LATENCY_BUCKETS))


def test_module_functions_feed_the_scrape() -> None:
    before, content_type = metrics.render_metrics()

    metrics.observe_request(record(product="basket", route="/basket/{x}"))
    metrics.observe_limit_decision("basket", "gold", "quota_exceeded")
    metrics.observe_limit_decision("basket", "gold", "quota_exceeded")
    metrics.count_storage_error("usage")
    metrics.count_reload(False)
    metrics.INFLIGHT.inc()
    with metrics.track_inflight():
        during, _ = metrics.render_metrics()
    metrics.INFLIGHT.dec()
    after, _ = metrics.render_metrics()

    assert content_type.startswith("text/plain; version=0.0.4")
    old, new = before.decode(), after.decode()

    def grew(name: str, **labels: str) -> float:
        return value(new, name, **labels) - value(old, name, **labels)

    request = {"product": "basket", "route": "/basket/{x}", "method": "GET", "status": "200"}
    assert grew("gateway_requests_total", **request, code="upstream") == 1
    assert grew("gateway_upstream_duration_seconds_count", product="basket") == 1
    decision = {"product": "basket", "plan": "gold", "decision": "quota_exceeded"}
    assert grew("gateway_limit_decisions_total", **decision) == 2
    assert grew("gateway_storage_errors_total", operation="usage") == 1
    assert grew("gateway_config_reloads_total", result="error") == 1
    assert (
        value(during.decode(), "gateway_inflight_requests")
        - value(old, "gateway_inflight_requests")
        == 2
    )
    assert grew("gateway_inflight_requests") == 0


def run_python(script: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


OBSERVE = """
    import sys
    from gateway import metrics
    from gateway.record import RequestRecord
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else {count}):
        metrics.observe_request(RequestRecord(
            request_id="r", method="GET", path="/p", start=0.0, status=200, code="upstream",
            product="soccer", route="/p", duration=0.002, upstream_duration=0.001))
    metrics.observe_limit_decision("soccer", "trial", "throttled")
    metrics.INFLIGHT.inc()  # left up: this process "dies" in the middle of a request
    import os
    print(os.getpid())
"""
RENDER = """
    import sys
    from gateway import metrics
    sys.stdout.write(metrics.render_metrics()[0].decode())
"""
DEAD = """
    import sys
    from gateway import metrics
    metrics.mark_worker_dead(int(sys.argv[1]) if len(sys.argv) > 1 else {pid})
"""


def multiprocess_env(directory: Path) -> dict[str, str]:
    return {**os.environ, metrics.MULTIPROC_ENV: str(directory)}


def test_workers_are_summed_and_a_dead_worker_leaves_the_inflight_gauge(tmp_path: Path) -> None:
    env = multiprocess_env(tmp_path)
    first_pid = int(run_python(OBSERVE.format(count=3), env))
    run_python(OBSERVE.format(count=4), env)

    text = run_python(RENDER, env)

    labels = {"product": "soccer", "route": "/p", "method": "GET", "status": "200"}
    assert value(text, "gateway_requests_total", **labels, code="upstream") == 7
    assert value(text, "gateway_request_duration_seconds_count", product="soccer", route="/p") == 7
    assert value(text, "gateway_upstream_duration_seconds_count", product="soccer") == 7
    decision = {"product": "soccer", "plan": "trial", "decision": "throttled"}
    assert value(text, "gateway_limit_decisions_total", **decision) == 2
    assert value(text, "gateway_inflight_requests") == 2

    run_python(DEAD.format(pid=first_pid), env)
    text = run_python(RENDER, env)

    assert value(text, "gateway_inflight_requests") == 1
    # Its requests were answered; they stay counted.
    assert value(text, "gateway_requests_total", **labels, code="upstream") == 7


FORKING_MASTER = """
    import os, sys
    from gateway import metrics          # imported before the mode is known, as a server does
    from gateway.record import RequestRecord
    directory = metrics.prepare_multiprocess_dir(sys.argv[1] if len(sys.argv) > 1 else {dir!r})
    children = []
    for count in (2, 5):
        pid = os.fork()
        if pid == 0:
            for _ in range(count):
                metrics.observe_request(RequestRecord(
                    request_id="r", method="GET", path="/p", start=0.0, status=200,
                    code="upstream", product="soccer", route="/p", duration=0.002))
            os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == directory
    sys.stdout.write(metrics.render_metrics()[0].decode())
"""


def test_prepare_after_import_makes_forked_workers_summed_and_clears_old_files(
    tmp_path: Path,
) -> None:
    # A previous run's worker left counts behind in the same folder.
    run_python(OBSERVE.format(count=100), multiprocess_env(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}

    text = run_python(FORKING_MASTER.format(dir=str(tmp_path)), env)

    labels = {"product": "soccer", "route": "/p", "method": "GET", "status": "200"}
    assert value(text, "gateway_requests_total", **labels, code="upstream") == 7
    assert value(text, "gateway_inflight_requests") == 0


def test_prepare_without_a_path_makes_a_folder() -> None:
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    script = """
        import os, shutil
        from gateway import metrics
        directory = metrics.prepare_multiprocess_dir(None)
        assert os.path.isdir(directory) and metrics.multiprocess_dir() == directory
        metrics.count_reload(True)
        text = metrics.render_metrics()[0].decode()
        shutil.rmtree(directory)
        print(text)
    """

    text = run_python(script, env)

    assert value(text, "gateway_config_reloads_total", result="ok") == 1
