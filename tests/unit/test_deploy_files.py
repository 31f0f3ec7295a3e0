"""Static checks of the container and dashboard files (no Docker engine is needed).

The Dockerfile passes hadolint, docker-compose.yml the Compose schema, the config compose mounts
loads, the Prometheus/Grafana files point at each other, and every metric the dashboard queries
is one the gateway defines and actually exposes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from gateway.admin import build_admin_app
from gateway.config.loader import load_config
from gateway.config.model import Config
from gateway.limits.memory import MemoryLimiter
from gateway.record import RequestRecord
from gateway.worker_stats import WorkerStats
from tests.support.apps import serving_app
from tests.support.paths import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy/grafana/dashboards/gateway.json"
GATEWAY_METRIC = re.compile(r"\bgateway_[a-z0-9_]+")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def tool(name: str) -> str:
    found = REPO_ROOT / ".venv/bin" / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        pytest.skip(f"{name} is not installed (pip install '.[dev]' provides it)")
    return on_path


def read_yaml(relative: str) -> Any:
    return yaml.safe_load((REPO_ROOT / relative).read_text())


def test_dockerfile_is_clean_under_hadolint() -> None:
    done = subprocess.run(
        [tool("hadolint"), "--no-color", "Dockerfile"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_compose_file_matches_the_compose_schema() -> None:
    done = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stdout + done.stderr


def test_the_config_compose_mounts_loads_with_two_workers_on_redis(tmp_path: Path) -> None:
    gateway = read_yaml("docker-compose.yml")["services"]["gateway"]
    for volume in gateway["volumes"]:
        source, target, *_ = volume.split(":")
        assert Path(target).parent == Path("/etc/gateway"), volume
        shutil.copy(REPO_ROOT / source, tmp_path / Path(target).name)
    env = {"GATEWAY_REDIS_URL": gateway["environment"]["GATEWAY_REDIS_URL"]}

    config = load_config(tmp_path, env={**env, "GATEWAY_ADMIN_TOKEN": "a-token"})

    assert config.server.workers == 2
    assert config.storage.url == "redis://redis:6379/0"
    assert str(config.server.listen) == "0.0.0.0:8080"
    assert str(config.server.admin_listen) == "0.0.0.0:9090"
    assert "GATEWAY_ADMIN_TOKEN" in gateway["environment"]


def test_prometheus_scrapes_the_admin_port_and_grafana_reads_prometheus() -> None:
    scrape = read_yaml("deploy/prometheus.yml")["scrape_configs"]
    targets = [
        target for job in scrape for conf in job["static_configs"] for target in conf["targets"]
    ]
    assert targets == ["gateway:9090"]

    datasource = read_yaml("deploy/grafana/provisioning/datasources/datasource.yml")
    (prometheus,) = datasource["datasources"]
    assert prometheus["url"] == "http://prometheus:9090"
    assert {panel["datasource"]["uid"] for panel in dashboard()["panels"]} == {prometheus["uid"]}

    providers = read_yaml("deploy/grafana/provisioning/dashboards/dashboards.yml")["providers"]
    grafana = read_yaml("docker-compose.yml")["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == providers[0]["options"]["path"]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> Iterator[str]:
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        yield query["query"] if isinstance(query, dict) else str(query or "")


def dashboard_metric_names() -> set[str]:
    names: set[str] = set()
    for expr in dashboard_queries():
        found = GATEWAY_METRIC.findall(expr)
        assert found or "gateway_" not in expr, expr
        names.update(HISTOGRAM_SUFFIX.sub("", name) for name in found)
    return names


def test_the_dashboard_shows_what_operators_need() -> None:
    exprs = "\n".join(dashboard_queries())

    for needle in (
        "gateway_requests_total",
        'decision=~"quota_exceeded|throttled"',
        "histogram_quantile(0.99, sum by (le) (rate(gateway_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(gateway_upstream_duration_seconds_bucket",
        'status="499"',
        'status=~"5.."',
        "gateway_storage_errors_total",
        "gateway_inflight_requests",
        "gateway_config_reloads_total",
        "gateway_quota_units_total",
        "gateway_quota_refunds_total",
        "gateway_quota_charges_total",
        "gateway_cost_reports_total",
        'decision=~"local_allowed|local_throttled"',
    ):
        assert needle in exprs, needle


def test_every_dashboard_metric_is_defined_in_gateway_metrics() -> None:
    registry = CollectorRegistry()
    metrics.GatewayMetrics(registry)
    registry.register(WorkerStats(None))  # this process as worker 0
    defined: set[str] = set()
    for family in registry.collect():
        defined.add(family.name + "_total" if family.type == "counter" else family.name)

    assert dashboard_metric_names() <= defined, dashboard_metric_names() - defined
    # Not vacuous: the dashboard covers every family.
    assert dashboard_metric_names() == defined


async def test_every_dashboard_metric_is_on_a_live_scrape() -> None:
    metrics.observe_request(
        RequestRecord(
            request_id="r",
            method="GET",
            path="/deploy-test",
            start=0.0,
            status=200,
            code="upstream",
            product="deploy-test",
            route="/deploy-test",
            duration=0.003,
            upstream_duration=0.002,
        )
    )
    metrics.observe_limit_decision("deploy-test", "trial", "throttled")
    metrics.observe_units("deploy-test", "trial", 10)
    metrics.count_refund("deploy-test", "trial", "ok", 10)
    metrics.count_charge("deploy-test", "trial", "ok", 10)
    metrics.count_cost_report("deploy-test", "/deploy-test", "ok")
    metrics.count_storage_error("hit")
    metrics.count_reload(True)
    metrics.count_websocket_bytes("deploy-test", 1, 2)
    async with (
        serving_app(build_admin_app(Config, MemoryLimiter(), token=None)) as port,
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()

    exposed = {
        HISTOGRAM_SUFFIX.sub("", sample.name)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert dashboard_metric_names() <= exposed, dashboard_metric_names() - exposed
