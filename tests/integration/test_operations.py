"""Operating a real `gateway run`: graceful SIGTERM, workers and their supervisor.

README, "Operating it", end to end on real processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.operations import (
    SECRET,
    ThreadedUpstream,
    call,
    children_of,
    connection_refused,
    cpu_seconds,
    parent_of,
    serving_workers,
    wait_for,
    write_config_on_free_ports,
)
from tests.support.processes import GatewayProcess
from tests.support.upstream import Upstream

# --- SIGTERM ------------------------------------------------------------------------------


def slow_request_survives_sigterm(gateway: GatewayProcess, upstream: Upstream) -> None:
    port = gateway.proxy_port
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            call, port, "/soccer/x/slow?for=1.2", headers={"X-API-Key": SECRET}, timeout=10
        )
        wait_for(upstream.started_slow.is_set, 5, "the slow request reached the upstream")
        gateway.signal(signal.SIGTERM)

        # It stops accepting at once, while the slow request is still being answered, and
        # tells a load balancer so on /readyz.
        wait_for(lambda: connection_refused(port), 1.0, "new connections refused")
        readyz = call(gateway.admin_port, "/readyz")
        assert (readyz.status, json.loads(readyz.body)["code"]) == (503, "not_ready")
        assert not in_flight.done()
        answer = in_flight.result(timeout=10)

    assert answer.status == 200
    assert json.loads(answer.body) == {"slow": True}
    assert not upstream.cancelled.is_set()
    assert gateway.proc is not None
    assert gateway.proc.wait(timeout=10) == 0, gateway.stderr()
    logged = [line for line in gateway.access_log() if line["path"].endswith("/slow")]
    assert [(line["status"], line["code"]) for line in logged] == [(200, "upstream")]


@pytest.mark.parametrize("workers", [None, 2], ids=["one-process", "two-workers"])
def test_sigterm_finishes_the_request_in_flight_then_exits_0(
    tmp_path: Path, request: pytest.FixtureRequest, workers: int | None
) -> None:
    # More than one worker needs shared storage.
    storage = request.getfixturevalue("redis_server").url if workers else "memory://"
    with ThreadedUpstream() as upstream:
        proxy_port, admin_port = write_config_on_free_ports(
            tmp_path / "config", upstream.url, storage
        )
        gateway = GatewayProcess(tmp_path / "config", workers=workers)
        try:
            gateway.start(proxy_port, admin_port)
            if workers:
                serving_workers(gateway, workers)
            started = time.monotonic()
            slow_request_survives_sigterm(gateway, upstream)
            assert time.monotonic() - started < 5
        finally:
            gateway.close()


@pytest.mark.parametrize("workers", [None, 2], ids=["one-process", "two-workers"])
def test_sigterm_repeated_until_the_end_still_exits_0(
    tmp_path: Path, request: pytest.FixtureRequest, workers: int | None
) -> None:
    """A runtime may send SIGTERM again while the gateway stops. Sent every few milliseconds
    from the first to the exit, it reaches every stage of the stop: the drain, the closed event
    loop (which puts the default action back) and the interpreter's exit. None may kill it."""
    storage = request.getfixturevalue("redis_server").url if workers else "memory://"
    proxy_port, admin_port = write_config_on_free_ports(
        tmp_path / "config", "http://127.0.0.1:9", storage
    )
    gateway = GatewayProcess(tmp_path / "config", workers=workers)
    try:
        gateway.start(proxy_port, admin_port)
        pids = serving_workers(gateway, workers) if workers else []
        assert gateway.proc is not None
        deadline = time.monotonic() + 20
        while gateway.proc.poll() is None and time.monotonic() < deadline:
            gateway.signal(signal.SIGTERM)
            for pid in pids:  # the workers too, as `kill` of a whole process group does
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            time.sleep(0.002)
        assert gateway.proc.returncode == 0, gateway.stderr()
        assert "while stopping" not in gateway.stderr()  # no worker killed either
    finally:
        gateway.close()


@contextlib.contextmanager
def two_workers(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[GatewayProcess, ThreadedUpstream, int]]:
    """A `gateway run` with two workers on Redis, both serving: the gateway, its upstream and
    its proxy port."""
    storage = request.getfixturevalue("redis_server").url
    with ThreadedUpstream() as upstream:
        proxy_port, admin_port = write_config_on_free_ports(
            tmp_path / "config", upstream.url, storage
        )
        gateway = GatewayProcess(tmp_path / "config", workers=2)
        try:
            gateway.start(proxy_port, admin_port)
            yield gateway, upstream, proxy_port
        finally:
            gateway.close()


def test_workers_end_when_the_supervisor_is_killed(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) takes its workers with it: they
    must not go on serving the port unsupervised."""
    with two_workers(tmp_path, request) as (gateway, _, _):
        workers = serving_workers(gateway, 2)
        gateway.signal(signal.SIGKILL)
        wait_for(
            lambda: all(parent_of(pid) is None for pid in workers) or None,
            15,
            "both workers gone after the supervisor was killed",
        )


def serves_steadily(gateway: GatewayProcess, proxy_port: int, seconds: float) -> None:
    """Requests keep being answered for `seconds`, and no worker is restarted meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert call(proxy_port, "/soccer/x", headers={"X-API-Key": SECRET}).status == 200
        time.sleep(0.05)
    assert "starting a new one" not in gateway.stderr(), gateway.stderr()


def test_workers_serve_when_the_supervisor_is_pid_1(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """In a container the gateway is pid 1, so its workers' parent is pid 1 too: they took
    that for an orphaned worker's and ended at once, restarted in a loop, serving nothing."""
    try:
        allowed = subprocess.run(["unshare", "-pf", "--mount-proc", "true"], check=False)
    except OSError:
        pytest.skip("needs unshare(1)")
    if allowed.returncode != 0:
        pytest.skip("needs the right to make a pid namespace (unshare -p)")
    storage = request.getfixturevalue("redis_server").url
    with ThreadedUpstream() as upstream:
        proxy_port, admin_port = write_config_on_free_ports(
            tmp_path / "config", upstream.url, storage
        )
        # --kill-child: should the test fail, the gateway ends with unshare.
        prefix = ["unshare", "-pf", "--mount-proc", "--kill-child=SIGTERM"]
        gateway = GatewayProcess(tmp_path / "config", workers=2, prefix=prefix)
        try:
            gateway.start(proxy_port, admin_port)
            serves_steadily(gateway, proxy_port, 1.5)
            # Stopped as a container runtime stops it: SIGTERM to the namespace's pid 1.
            assert gateway.proc is not None
            (supervisor,) = children_of(gateway.proc.pid)
            os.kill(supervisor, signal.SIGTERM)
            gateway.proc.wait(timeout=15)
        finally:
            gateway.close()


def test_a_child_that_is_no_worker_ending_does_not_end_the_supervisor(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """`sh -c 'tool & exec gateway run ...'` leaves the gateway a child of its own, and pid 1
    adopts orphans: collecting one ended the supervisor with a KeyError, and the workers."""
    storage = request.getfixturevalue("redis_server").url
    with ThreadedUpstream() as upstream:
        proxy_port, admin_port = write_config_on_free_ports(
            tmp_path / "config", upstream.url, storage
        )
        prefix = ["sh", "-c", 'sleep 0.3 & exec "$0" "$@"']
        gateway = GatewayProcess(tmp_path / "config", workers=2, prefix=prefix)
        try:
            gateway.start(proxy_port, admin_port)
            assert gateway.proc is not None
            supervisor = gateway.proc.pid
            # Its children: the two workers and the sleep, then (the sleep over and
            # collected, not left a zombie) the two workers.
            wait_for(lambda: len(children_of(supervisor)) == 2 or None, 5, "the sleep collected")
            serves_steadily(gateway, proxy_port, 0.5)
            assert gateway.stop() == 0, gateway.stderr()
        finally:
            gateway.close()


def test_sigterm_during_a_crashed_workers_restart_still_stops_everything(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The supervisor naps before restarting a crashed worker: a SIGTERM in that nap must not
    leave a new worker serving on, unsignalled, with the supervisor waiting for it."""
    with two_workers(tmp_path, request) as (gateway, _, proxy_port):
        crashed, survivor = serving_workers(gateway, 2)
        os.kill(crashed, signal.SIGKILL)
        # Signalled in the 0.5 s the supervisor naps between noticing and restarting.
        wait_for(lambda: "starting a new one" in gateway.stderr(), 5, "the crash noticed")
        gateway.signal(signal.SIGTERM)
        assert gateway.proc is not None
        assert gateway.proc.wait(timeout=15) == 0, gateway.stderr()
        assert parent_of(survivor) is None
        assert connection_refused(proxy_port)


def test_a_crash_looping_worker_is_restarted_ever_more_slowly(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A worker that dies soon after its start waits twice as long before each new start
    (0.5 s, 1 s, ...): a crash loop must not spin the machine or flood the log. The other
    worker serves on meanwhile, and a SIGTERM during the wait still stops everything."""
    with two_workers(tmp_path, request) as (gateway, _, proxy_port):
        first, survivor = serving_workers(gateway, 2)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: "starting a new one in 0.5 s" in gateway.stderr(), 5, "the first crash")
        second = serving_workers(gateway, 2)[-1]
        assert second not in (first, survivor)
        os.kill(second, signal.SIGKILL)  # soon after its start: a crash loop
        killed_at = time.monotonic()
        wait_for(lambda: "starting a new one in 1.0 s" in gateway.stderr(), 5, "the second crash")
        assert call(proxy_port, "/soccer/x", headers={"X-API-Key": SECRET}).status == 200
        third = serving_workers(gateway, 2)[-1]
        assert third not in (first, second, survivor)
        waited = time.monotonic() - killed_at
        assert waited >= 1.0, f"restarted {waited:.2f} s after the second quick death"
        os.kill(third, signal.SIGKILL)
        wait_for(lambda: "starting a new one in 2.0 s" in gateway.stderr(), 5, "the third crash")
        gateway.signal(signal.SIGTERM)  # during the 2 s wait
        assert gateway.proc is not None
        assert gateway.proc.wait(timeout=15) == 0, gateway.stderr()
        assert parent_of(survivor) is None
        assert connection_refused(proxy_port)


def test_a_stopping_supervisor_waits_idle(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """While its workers drain, the supervisor sleeps between looks at them: it used to spin,
    ~15% of a core for the whole drain."""
    with two_workers(tmp_path, request) as (gateway, upstream, proxy_port):
        serving_workers(gateway, 2)
        assert gateway.proc is not None
        supervisor = gateway.proc.pid
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(
                call, proxy_port, "/soccer/x/slow?for=1.6", headers={"X-API-Key": SECRET}
            )
            wait_for(upstream.started_slow.is_set, 5, "the slow request reached the upstream")
            gateway.signal(signal.SIGTERM)
            before = cpu_seconds(supervisor)
            time.sleep(1.0)  # the drain of the slow request, which has 0.6 s more to go
            spent = cpu_seconds(supervisor) - before
            assert slow.result(timeout=10).status == 200
        assert gateway.proc.wait(timeout=15) == 0
        assert spent < 0.06, f"the stopping supervisor used {spent:.2f} s of CPU in 1 s"
