"""Reloading a big config (one a child process reads: see gateway.config.isolated) in a
`gateway run` with two workers: the supervisor reads it once, both workers serve the edit, and
requests go on being answered meanwhile."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config.isolated import CHILD_FROM_BYTES
from tests.support.config import server_yaml
from tests.support.operations import (
    ThreadedUpstream,
    call,
    children_of,
    scrape,
    serving_workers,
    wait_for,
)
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.sockets import free_ports

KEYS = 3_000
# From the edit to both workers serving it: two polls (0.5 s), a parse of a fraction of a
# second, the hand-over; loose for a busy 2-core machine.
APPLIED_WITHIN = 10.0


def write_keys(path: Path, extra: str = "", keys: int = KEYS) -> None:
    lines = ["keys:", "  - {name: probe, key: probe-secret, plans: {shop: open}}"]
    for index in range(keys):
        digest = hashlib.sha256(f"secret-{index}".encode()).hexdigest()
        lines += [
            f"  - name: customer-{index}",
            f"    key_sha256: {digest}",
            "    plans: {shop: open}",
        ]
    partial = path.with_suffix(".partial")
    partial.write_text("\n".join([*lines, extra]) + "\n")
    partial.replace(path)


@dataclass
class BigConfig:
    """A serving `gateway run` whose config holds `keys` file keys (see `big_config`)."""

    gateway: GatewayProcess
    proxy_port: int
    admin_port: int
    keys_file: Path
    keys: int
    process: int  # the supervisor, or the one process
    workers: list[int]  # with a supervisor, its serving workers

    def status(self, key: str) -> int:
        return call(self.proxy_port, "/shop/x", headers={"X-API-Key": key}).status

    def all_serve(self, key: str, times: int = 20) -> bool:
        # New connections: the kernel spreads them over the workers.
        return all(self.status(key) == 200 for _ in range(times))

    def write_keys(self, extra: str = "") -> None:
        write_keys(self.keys_file, extra, keys=self.keys)

    def add_a_key(self) -> None:
        self.write_keys("  - {name: added, key: added-secret, plans: {shop: open}}")


@contextlib.contextmanager
def big_config(
    tmp_path: Path, storage_url: str, keys: int, workers: int = 2
) -> Iterator[BigConfig]:
    """A gateway of `workers` (a supervisor when more than one) on `storage_url`, one product
    before a ThreadedUpstream and `keys` file keys (plus `probe-secret`), started and serving;
    stopped with exit code 0 at the end."""
    proxy_port, admin_port = free_ports(2)
    config = tmp_path / "config"
    config.mkdir()
    (config / "00-server.yaml").write_text(
        server_yaml(proxy_port, admin_port, storage_url, workers=workers)
    )
    keys_file = config / "20-keys.yaml"
    write_keys(keys_file, keys=keys)
    with ThreadedUpstream() as upstream:
        (config / "10-api.yaml").write_text(
            "products:\n"
            f"  shop:\n    upstream: {{url: '{upstream.url}'}}\n"
            "    routes:\n      - path: /shop/{rest:path}\n"
            "plans:\n  open: {rate: {limit: 100000, per: second}}\n"
        )
        gateway = GatewayProcess(config)
        try:
            gateway.start(proxy_port, admin_port, timeout=60)
            serving = serving_workers(gateway, workers, timeout=60) if workers > 1 else []
            assert gateway.proc is not None
            yield BigConfig(
                gateway, proxy_port, admin_port, keys_file, keys, gateway.proc.pid, serving
            )
        finally:
            assert gateway.stop() == 0, gateway.stderr()
            gateway.close()


def test_two_workers_reload_a_big_config_while_answering(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with big_config(tmp_path, redis_server.url, KEYS) as rig:
        assert rig.keys_file.stat().st_size >= CHILD_FROM_BYTES
        assert rig.status("probe-secret") == 200
        assert rig.status("added-secret") == 401
        answers: list[int] = []
        stop = threading.Event()

        def keep_asking() -> None:
            while not stop.is_set():
                answers.append(rig.status("probe-secret"))
                time.sleep(0.02)

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            rig.add_a_key()
            wait_for(
                lambda: rig.all_serve("added-secret"),
                APPLIED_WITHIN,
                "both workers serve the added key",
            )
        finally:
            stop.set()
            asker.join()
        assert answers and set(answers) == {200}
        stderr = rig.gateway.stderr()
        assert "reading the config in a child process failed" not in stderr
        # The supervisor read the edit once and counted it once; the workers took its
        # result (each logs the reload it applied).
        assert stderr.count("config reloaded from") == 3


# Keys enough for the supervisor's memory to tell a config held from one let go (about 12 MiB
# held at 30,000 keys), few enough to read in a second or two.
SUPERVISOR_KEYS = 30_000
# What the supervisor may grow by at a reload without holding the config it handed over: the
# reading of it, let go (0.4 MiB measured at 30,000 keys).
SUPERVISOR_GROWTH_MIB = 5.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_the_supervisor_keeps_no_config_it_handed_over(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """It checks each reload and saves it for the workers; held on for a worker started later,
    a reload of 100,000 file keys grew it from 77 to 118 MiB. A worker that dies after the
    reload is replaced by one that reads the config where the running ones did."""
    with big_config(tmp_path, redis_server.url, SUPERVISOR_KEYS) as rig:
        assert rig.status("added-secret") == 401
        started_with = rss_mib(rig.process)
        rig.add_a_key()
        wait_for(lambda: rig.all_serve("added-secret"), APPLIED_WITHIN, "the added key served")
        grown = rss_mib(rig.process) - started_with
        assert grown < SUPERVISOR_GROWTH_MIB, f"{grown:.1f} MiB more after the reload"

        os.kill(rig.workers[0], signal.SIGKILL)
        wait_for(
            lambda: [pid for pid in children_of(rig.process) if pid not in rig.workers],
            10,
            "a replacement worker",
        )
        serving = serving_workers(rig.gateway, 2, timeout=60)
        assert rig.workers[0] not in serving
        assert rig.all_serve("added-secret")


def test_a_worker_that_dies_during_a_reload_is_started_again_during_it(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The supervisor waited for the child reading the files with its loop stopped (5-8 s for
    100,000 keys): a worker that died meanwhile was started again only after the reload, one
    worker short all that time. The reading child is held stopped here for as long as the test
    needs: the dead worker's replacement must start while it is."""
    with big_config(tmp_path, redis_server.url, SUPERVISOR_KEYS) as rig:

        def others(*known: int) -> list[int]:
            return [pid for pid in children_of(rig.process) if pid not in known]

        rig.add_a_key()
        rig.gateway.signal(signal.SIGHUP)
        reading = wait_for(lambda: others(*rig.workers), 15, "the reload's child")[0]
        os.kill(reading, signal.SIGSTOP)
        try:
            os.kill(rig.workers[0], signal.SIGKILL)
            wait_for(lambda: others(*rig.workers, reading), 10, "a worker started meanwhile")
        finally:
            os.kill(reading, signal.SIGCONT)
        # Started from the config before the reload, it is handed the reload with the other.
        serving = serving_workers(rig.gateway, 2, timeout=60)
        assert rig.workers[0] not in serving
        wait_for(lambda: rig.all_serve("added-secret"), 30, "both workers serve the reload")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_config_is_read_is_not_fatal(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """Before any handler was in place (while the config is read: seconds with many keys),
    SIGTERM killed the gateway (143, not the exit 0 of a stop) and SIGHUP killed it (129); as
    a container's pid 1 it dropped them unseen. They are held until they can be acted on."""
    proxy_port, admin_port = free_ports(2)
    config = tmp_path / "config"
    config.mkdir()
    (config / "00-server.yaml").write_text(server_yaml(proxy_port, admin_port, "memory://"))
    (config / "10-api.yaml").write_text(
        "products:\n  shop:\n    upstream: {url: 'http://127.0.0.1:9'}\n"
        "    routes:\n      - path: /shop/{rest:path}\n"
        "plans:\n  open: {rate: {limit: 100000, per: second}}\n"
    )
    write_keys(config / "20-keys.yaml")
    command = [sys.executable, "-m", "gateway", "run", "--config", str(config)]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        try:
            # `serve` holds the signals from its first line until it can act on them: seen
            # holding them, the gateway is starting (reading its 3,000 keys).
            wait_for(lambda: _holds_stop_signals(proc.pid), 15, "the gateway starting")
            proc.send_signal(sig)
            if sig == signal.SIGHUP:
                wait_for(lambda: _answers(admin_port), 15, "serving after the SIGHUP")
                proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read().decode()


def _holds_stop_signals(pid: int) -> bool:
    """Whether the process blocks SIGHUP, SIGINT and SIGTERM (its SigBlk mask in /proc)."""
    held = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return all(mask & (1 << (sig - 1)) for sig in held)
    return False


def _answers(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=1):
            return True
    except OSError:
        return False


# Keys enough that reading them takes the supervisor's child most of a second, so that a second
# SIGHUP comes while the first reload is still reading.
SLOW_READ_KEYS = 10_000


def test_a_sighup_during_a_reload_applies_the_edit_it_announces(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A deploy writes a file and sends SIGHUP, then writes another and sends SIGHUP again. The
    supervisor's SIGHUP handler ran the second reload inside the first (whose child was still
    reading the files): the second handed the workers the newest files, then the first, ending
    last, handed them its older reading, and set nothing for the watch to see: the second edit
    was never served. Reloads now run one after the other, the second reading the files anew."""
    with big_config(tmp_path, redis_server.url, SLOW_READ_KEYS) as rig:
        first = "  - {name: first, key: first-secret, plans: {shop: open}}"
        second = "  - {name: second, key: second-secret, plans: {shop: open}}"
        rig.write_keys(first)
        rig.gateway.signal(signal.SIGHUP)
        time.sleep(0.2)  # the first reload's child has read the files and is parsing them
        rig.write_keys(f"{first}\n{second}")
        rig.gateway.signal(signal.SIGHUP)

        def both_serve_both() -> bool:
            return all(
                rig.status("first-secret") == 200 and rig.status("second-secret") == 200
                for _ in range(10)
            )

        wait_for(both_serve_both, APPLIED_WITHIN, "both workers serve both keys")


# Keys enough that one process's load (a child reads them, the worker indexes them) lasts a
# second or more, so that a burst of SIGHUPs, a few milliseconds long, comes within it.
BURST_KEYS = 20_000
BURST = 5
# Longer than a load queued behind another takes to start its child on a busy machine.
QUIET = 0.75


@pytest.mark.parametrize("workers", [1, 2])
def test_sighups_during_a_load_make_one_more_load_of_the_last_edit(
    tmp_path: Path, workers: int, redis_server: RedisServer
) -> None:
    """A deploy writes several files and signals after each. Each SIGHUP queued a whole load
    in a single process (five of 8 s each with 100,000 keys, the last edit served 40 s late);
    those that come during a load now make one more load after it, of the files as they are
    then. The watch sees the same edits and joins in, not adding a load of its own. With two
    workers the supervisor loads as one process does, and each worker takes both loads."""
    storage = "memory://" if workers == 1 else redis_server.url
    with big_config(tmp_path, storage, BURST_KEYS, workers) as rig:

        def reading() -> list[int]:
            """The child that reads the files for a load (a worker is no such child)."""
            return [pid for pid in children_of(rig.process) if pid not in rig.workers]

        def reloads() -> dict[tuple[str, ...], float]:
            series = scrape(rig.admin_port).series("gateway_config_reloads_total", "result")
            return {result: count for result, count in series.items() if count}

        edits = [
            f"  - {{name: edit-{n}, key: edit-{n}-secret, plans: {{shop: open}}}}"
            for n in range(BURST)
        ]
        rig.write_keys(edits[0])
        rig.gateway.signal(signal.SIGHUP)
        wait_for(reading, 15, "the first load under way")
        for n in range(1, BURST):
            rig.write_keys("\n".join(edits[: n + 1]))
            rig.gateway.signal(signal.SIGHUP)
        assert reloads() == {}, "the burst came after the first load; no test"
        wait_for(lambda: reloads().get(("ok",), 0) >= 2, 60, "two loads")

        def every_edit_served() -> bool:
            # New connections: the kernel spreads them over the workers.
            return all(rig.status(f"edit-{n % BURST}-secret") == 200 for n in range(10 * workers))

        wait_for(every_edit_served, 30, "every edit served")
        # A load queued behind those two would start at once, its child a moment later.
        quiet_until = time.monotonic() + QUIET
        while time.monotonic() < quiet_until:
            assert not reading(), "a third load"
            time.sleep(0.02)
        assert reloads() == {("ok",): 2}
