"""Metrics and the access log of a real `gateway run` process after a scripted mix of requests.

One gateway (Redis storage of its own, so the storage can fail on cue) answers a known mix of
statuses once for the module; the tests then compare the exact numbers of the scrape and the
exact lines of the access log with the mix. A second gateway runs two workers and shows the
scrape sums them, whichever worker answers it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.config import server_yaml, write_config
from tests.support.operations import (
    Answer,
    Scrape,
    ThreadedUpstream,
    call,
    requests_counted_by_worker,
    scrape,
    serving_workers,
    wait_for,
)
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.sockets import closed_port, free_ports
from tests.support.upstream import Upstream

ROUTE = "/soccer/{rest:path}"
BROKEN_ROUTE = "/broken/{rest:path}"
KEYS = {
    "rate-user": "plain-RATE-secret-0001",
    "quota-user": "plain-QUOTA-secret-0002",
    "open-user": "plain-OPEN-secret-0003",
}
WRONG_KEY = "plain-WRONG-secret-9999"

API = """
products:
  soccer:
    upstream: {{url: "{upstream}/base", connect_timeout: 1s, timeout: 5s}}
    routes:
      - path: /soccer/{{rest:path}}
        methods: [GET]
  broken:
    upstream: {{url: "http://127.0.0.1:{closed}"}}
    routes:
      - path: /broken/{{rest:path}}
plans:
  metered: {{rate: {{limit: 3, per: minute}}}}
  tiny: {{quota: {{limit: 1, per: day}}}}
  open: {{}}
keys:
  - {{name: rate-user, key: {rate}, plans: {{soccer: metered}}}}
  - {{name: quota-user, key: {quota}, plans: {{soccer: tiny}}}}
  - {{name: open-user, key: {open}, plans: {{soccer: open, broken: open}}}}
"""


def key(name: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[name]}


def write_gateway_config(directory: Path, upstream: Upstream, storage_url: str) -> tuple[int, int]:
    """The mix's config in `directory`; returns the proxy and admin ports it listens on."""
    proxy_port, admin_port = free_ports(2)
    api = API.format(
        upstream=upstream.url,
        closed=closed_port(),
        rate=KEYS["rate-user"],
        quota=KEYS["quota-user"],
        open=KEYS["open-user"],
    )
    write_config(directory, api, server=server_yaml(proxy_port, admin_port, storage_url))
    return proxy_port, admin_port


@dataclass
class Mix:
    gateway: GatewayProcess
    answers: list[tuple[str, int]]  # (what, status) of each answered request, in order
    scrape: Scrape  # right after the mix
    access_log: list[dict[str, Any]]  # right after the mix
    redis: RedisServer  # stopped at the end of the mix


def expect(answer: Answer, status: int, code: str | None = None) -> Answer:
    assert answer.status == status, (answer.status, answer.body)
    if code is not None:
        assert json.loads(answer.body)["code"] == code, answer.body
    return answer


def client_gives_up_on_slow_upstream(port: int, upstream: Upstream) -> None:
    """A request whose client hangs up while the upstream is still working: 499."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(
            b"GET /soccer/x/slow?for=3 HTTP/1.1\r\nHost: t\r\n"
            b"X-API-Key: " + KEYS["open-user"].encode() + b"\r\n\r\n"
        )
        wait_for(upstream.started_slow.is_set, 5, "the slow request reached the upstream")
    wait_for(upstream.cancelled.is_set, 5, "the gateway cancelled the upstream request")


def run_mix(
    gateway: GatewayProcess, upstream: Upstream, redis: RedisServer
) -> list[tuple[str, int]]:
    port = gateway.proxy_port
    answers: list[tuple[str, int]] = [("startup probe GET /", 404)]  # GatewayProcess.start's

    def record(what: str, answer: Answer, status: int, code: str | None = None) -> None:
        expect(answer, status, code)
        answers.append((what, status))

    for i in range(3):
        # One of them carries its key in the query string, which the log must not show.
        if i == 0:
            answer = call(port, f"/soccer/a?api_key={KEYS['rate-user']}&x=1")
        else:
            answer = call(port, "/soccer/a", headers=key("rate-user"))
        record("rate-user admitted", answer, 200)
    for _ in range(2):
        record("rate-user throttled", call(port, "/soccer/a", headers=key("rate-user")), 429)
    record("quota-user admitted", call(port, "/soccer/b", headers=key("quota-user")), 200)
    record(
        "quota-user over quota",
        call(port, "/soccer/b", headers=key("quota-user")),
        429,
        "quota_exceeded",
    )
    record("no key", call(port, "/soccer/c"), 401, "unauthorized")
    record("wrong key", call(port, "/soccer/c", headers={"X-API-Key": WRONG_KEY}), 401)
    record("no route", call(port, "/nowhere"), 404, "invalid_route")
    record("wrong method", call(port, "/soccer/a", method="POST"), 405)
    record("refused upstream", call(port, "/broken/x", headers=key("open-user")), 502)
    client_gives_up_on_slow_upstream(port, upstream)
    answers.append(("client closed", 499))
    redis.stop()
    record(
        "storage down",
        call(port, "/soccer/a", headers=key("rate-user")),
        503,
        "storage_unavailable",
    )
    return answers


@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mix]:
    base = tmp_path_factory.mktemp("metrics-mix")
    redis = RedisServer(base / "redis")
    redis.start()
    with ThreadedUpstream() as upstream:
        proxy_port, admin_port = write_gateway_config(base / "config", upstream, redis.url)
        gateway = GatewayProcess(base / "config")
        try:
            gateway.start(proxy_port, admin_port)
            answers = run_mix(gateway, upstream, redis)

            # The 499 is counted when the gateway notices the hang-up, a moment after it.
            def all_counted() -> Scrape | None:
                current = scrape(admin_port)
                return current if current.total("gateway_requests_total") == len(answers) else None

            after = wait_for(all_counted, 3, "every request of the mix counted")

            # The access log writes its lines in batches, at least once a second.
            def all_logged() -> list[dict[str, Any]] | None:
                lines = gateway.access_log()
                return lines if len(lines) >= len(answers) else None

            logged = wait_for(all_logged, 3, "every request of the mix logged")
            yield Mix(gateway, answers, after, logged, redis)
        finally:
            gateway.close()
            redis.stop()


def test_requests_total_has_exactly_the_mix(mix: Mix) -> None:
    requests = mix.scrape.series(
        "gateway_requests_total", "product", "route", "method", "status", "code"
    )

    assert requests == {
        ("soccer", ROUTE, "GET", "200", "upstream"): 4,
        ("soccer", ROUTE, "GET", "429", "throttled"): 2,
        ("soccer", ROUTE, "GET", "429", "quota_exceeded"): 1,
        ("soccer", ROUTE, "GET", "401", "unauthorized"): 2,
        # The startup probe of GatewayProcess and the mix's own request.
        ("", "", "GET", "404", "invalid_route"): 2,
        # A path that matches only with another method is counted under the route it matched.
        ("soccer", ROUTE, "POST", "405", "method_not_allowed"): 1,
        ("broken", BROKEN_ROUTE, "GET", "502", "bad_gateway"): 1,
        ("soccer", ROUTE, "GET", "499", "client_closed"): 1,
        ("soccer", ROUTE, "GET", "503", "storage_unavailable"): 1,
    }
    assert sum(requests.values()) == len(mix.answers)


def test_limit_decisions_storage_errors_and_histograms(mix: Mix) -> None:
    s = mix.scrape

    assert s.series("gateway_limit_decisions_total", "product", "plan", "decision") == {
        ("soccer", "metered", "allowed"): 3,
        ("soccer", "metered", "throttled"): 2,
        ("soccer", "metered", "storage_error"): 1,
        ("soccer", "tiny", "allowed"): 1,
        ("soccer", "tiny", "quota_exceeded"): 1,
    }
    errors = s.series("gateway_storage_errors_total", "operation")
    assert errors.pop(("hit",)) == 1
    # Besides: the key store's own calls to the stopped Redis, as it retries following it.
    assert all(operation.startswith("key_") for (operation,) in errors), errors
    assert s.series("gateway_request_duration_seconds_count", "product", "route") == {
        ("soccer", ROUTE): 12,  # the 405 too
        ("", ""): 2,
        ("broken", BROKEN_ROUTE): 1,
    }
    # Only answers the upstream gave have an upstream duration: not the 502, not the 499.
    assert s.series("gateway_upstream_duration_seconds_count", "product") == {("soccer",): 4}
    assert s.series("gateway_inflight_requests") == {(): 0}
    # No reload yet: both results shown, at 0, so that an alert has a series from the start.
    assert s.series("gateway_config_reloads_total", "result") == {("ok",): 0, ("error",): 0}
    # The +Inf bucket holds every observation.
    buckets = s.series("gateway_request_duration_seconds_bucket", "product", "route", "le")
    assert buckets[("soccer", ROUTE, "+Inf")] == 12


def test_no_key_or_key_name_appears_in_the_scrape(mix: Mix) -> None:
    for secret in [*KEYS.values(), WRONG_KEY, *KEYS]:
        assert secret not in mix.scrape.text


def test_access_log_has_one_line_per_request_with_every_field(mix: Mix) -> None:
    lines = mix.access_log
    fields = {
        "time",
        "request_id",
        "method",
        "path",
        "status",
        "code",
        "product",
        "route",
        "key",
        "plan",
        "duration_ms",
        "upstream_ms",
        "bytes_sent",
    }

    assert [line["status"] for line in lines] == [status for _, status in mix.answers]
    for line in lines:
        assert set(line) == fields, line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
        assert "?" not in line["path"]
    by_status = {line["status"]: line for line in lines}
    closed = by_status[499]
    assert (closed["code"], closed["key"], closed["plan"], closed["route"]) == (
        "client_closed",
        "open-user",
        "open",
        ROUTE,
    )
    admitted = lines[1]
    assert admitted["path"] == "/soccer/a"
    assert (admitted["code"], admitted["key"], admitted["plan"]) == (
        "upstream",
        "rate-user",
        "metered",
    )
    assert admitted["upstream_ms"] > 0 and admitted["bytes_sent"] > 0
    assert by_status[502]["upstream_ms"] is None
    assert by_status[401]["key"] == ""  # no key was recognised


def test_no_key_material_anywhere_in_stdout(mix: Mix) -> None:
    stdout = mix.gateway.stdout()
    assert stdout.count("\n") >= len(mix.answers)
    for secret in [*KEYS.values(), WRONG_KEY]:
        assert secret not in stdout


def test_a_scrape_counts_every_request_answered_before_it(mix: Mix) -> None:
    port, admin_port = mix.gateway.proxy_port, mix.gateway.admin_port
    # The mix ended with the storage down: with it back, proxied answers (counted before they
    # are complete) as well as the gateway's own.
    mix.redis.start()
    wait_for(
        lambda: call(port, "/soccer/d", headers=key("open-user")).status == 200 or None,
        5,
        "the storage answering again",
    )
    requests = [
        ("/soccer/d", key("open-user"), 200),
        ("/nowhere", {}, 404),
        ("/soccer/d", {}, 401),
        ("/broken/d", key("open-user"), 502),
    ]
    counted = scrape(admin_port).total("gateway_requests_total")
    for i in range(24):
        path, headers, status = requests[i % len(requests)]
        expect(call(port, path, headers=headers), status)
        counted += 1
        assert scrape(admin_port).total("gateway_requests_total") == counted, (i, path)


def test_promtool_accepts_a_live_scrape(mix: Mix) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus)")
    text = call(mix.gateway.admin_port, "/metrics").body

    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert b"gateway_requests_total" in text  # not vacuous: the scrape has the families


# --- two workers --------------------------------------------------------------------------


@dataclass
class TwoWorkers:
    gateway: GatewayProcess
    proxy_port: int
    admin_port: int
    workers: list[int]  # their pids, serving


@contextmanager
def two_workers(tmp_path: Path, redis_server: RedisServer) -> Iterator[TwoWorkers]:
    """A gateway with two workers on Redis, both serving; stopped with exit 0 afterwards."""
    with ThreadedUpstream() as upstream:
        proxy_port, admin_port = write_gateway_config(
            tmp_path / "config", upstream, redis_server.url
        )
        gateway = GatewayProcess(tmp_path / "config", workers=2)
        try:
            gateway.start(proxy_port, admin_port)
            yield TwoWorkers(gateway, proxy_port, admin_port, serving_workers(gateway, 2))
        finally:
            assert gateway.stop() == 0, gateway.stderr()
            gateway.close()


def test_two_workers_are_summed_in_every_scrape(tmp_path: Path, redis_server: RedisServer) -> None:
    with two_workers(tmp_path, redis_server) as running:
        proxy_port, admin_port = running.proxy_port, running.admin_port
        sent = 1  # the startup probe
        # New connections (call() closes each one) let the kernel spread them over both.
        for i in range(40):
            if i % 2:
                expect(call(proxy_port, "/soccer/e", headers=key("open-user")), 200)
            else:
                expect(call(proxy_port, "/nowhere"), 404)
            sent += 1
            # Whichever worker answers the scrape, it sees both workers' counts.
            assert scrape(admin_port).total("gateway_requests_total") == sent
        for _ in range(6):
            assert scrape(admin_port).total("gateway_requests_total") == sent
        per_worker = [requests_counted_by_worker(pid, tmp_path) for pid in running.workers]
        assert all(count > 0 for count in per_worker), per_worker
        assert sum(per_worker) == sent
        assert scrape(admin_port).series("gateway_inflight_requests") == {(): 0}


def _open_files_soft_limit(pid: int) -> float:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return float(line.split()[3])
    raise AssertionError("no open files line")


def test_each_worker_reports_its_open_files_memory_and_cpu(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """prometheus-client's multiprocess mode has no `process_*` metrics: with two workers an
    operator could not see one nearing its limit of open files. Every scrape, whichever worker
    answers it, reports both, by worker number; a worker started again in place of one that
    died is reported under the same number."""
    with two_workers(tmp_path, redis_server) as running:
        first = running.workers[0]
        for _ in range(6):  # new connections: either worker may answer
            found = scrape(running.admin_port)
            assert set(found.series("gateway_worker_open_fds", "worker")) == {("0",), ("1",)}
            assert all(n >= 3 for n in found.series("gateway_worker_open_fds").values())
            limits = set(found.series("gateway_worker_max_fds").values())
            assert limits == {_open_files_soft_limit(first)}
            memory = found.series("gateway_worker_resident_memory_bytes").values()
            assert all(n > 10 * 2**20 for n in memory)
            assert len(found.series("gateway_worker_cpu_seconds_total", "worker")) == 2

        os.kill(first, signal.SIGKILL)
        gateway = running.gateway
        wait_for(lambda: first not in serving_workers(gateway, 2) or None, 20, "a new worker")
        found = scrape(running.admin_port)
        assert set(found.series("gateway_worker_open_fds", "worker")) == {("0",), ("1",)}


def test_one_process_reports_itself_as_worker_0(mix: Mix) -> None:
    found = scrape(mix.gateway.admin_port)
    assert mix.gateway.proc is not None
    pid = mix.gateway.proc.pid
    assert found.series("gateway_worker_max_fds", "worker") == {("0",): _open_files_soft_limit(pid)}
    assert found.series("gateway_worker_open_fds", "worker")[("0",)] >= 3
