"""Reloading the config of a running `gateway run`: file watch, SIGHUP, bad edits (README,
"Operating it").

Each config version differs in which routes exist (`gone: true` routes answer 410 without an
upstream), so "the new config serves" is one request away. A SIGHUP is tested with an edit the
file watch cannot see (same size, the old mtime put back), so nothing but the signal can load it.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from gateway.config import load_config
from gateway.server import Worker
from tests.support.config import (
    API_FILE,
    SERVER_FILE,
    server_yaml,
    worker_server_yaml,
    write_config,
)
from tests.support.operations import (
    call,
    children_of,
    requests_counted_by_worker,
    scrape,
    serving_workers,
    wait_for,
)
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.sockets import closed_port, free_ports

API = """\
products:
  shop:
    upstream: {{url: "http://127.0.0.1:{closed}"}}
    routes:
{routes}
plans:
  open: {{{plan}}}
keys:
  - {{name: reloader, key: reload-secret, plans: {{shop: open}}}}
"""


class Gateway:
    """A gateway process, its API file, and the number of proxy requests it was sent."""

    def __init__(self, directory: Path, storage_url: str, workers: int | None) -> None:
        self.proxy_port, self.admin_port = free_ports(2)
        self.closed = closed_port()
        write_config(
            directory,
            self.api_text("shop"),
            server=server_yaml(self.proxy_port, self.admin_port, storage_url),
        )
        self.api_file = directory / API_FILE
        self.process = GatewayProcess(directory, workers=workers)
        self.sent = 1  # GatewayProcess.start's probe

    def api_text(self, *gone_prefixes: str, plan: str = "") -> str:
        routes = "".join(
            f'      - {{path: "/{prefix}/{{rest:path}}", gone: true}}\n' for prefix in gone_prefixes
        )
        return API.format(closed=self.closed, routes=routes.rstrip("\n"), plan=plan)

    def write(self, *gone_prefixes: str, plan: str = "", keep_stat: bool = False) -> None:
        text = self.api_text(*gone_prefixes, plan=plan)
        before = self.api_file.stat() if keep_stat else None
        self.api_file.write_text(text)
        if before is not None:
            # Same size and mtime as before: invisible to the watch, only a SIGHUP loads it.
            assert self.api_file.stat().st_size == before.st_size
            os.utime(self.api_file, ns=(before.st_atime_ns, before.st_mtime_ns))

    def status(self, prefix: str) -> int:
        self.sent += 1
        return call(self.proxy_port, f"/{prefix}/x").status

    def serves(self, prefix: str) -> bool:
        return self.status(prefix) == 410

    def reloads(self) -> dict[tuple[str, ...], float]:
        """The reloads counted so far, by result (both are shown at 0 from the start)."""
        series = scrape(self.admin_port).series("gateway_config_reloads_total", "result")
        return {result: count for result, count in series.items() if count}

    def requests_counted(self) -> float:
        return scrape(self.admin_port).total("gateway_requests_total")


def settle() -> None:
    """Longer than a watch poll plus its pause: a second (wrong) reload would have happened."""
    time.sleep(0.75)


def check_reloads(gw: Gateway, *, workers: list[int] | None, scratch: Path) -> None:
    def every_worker_serves(prefix: str) -> bool:
        """Whether requests over new connections, enough for each worker to answer some, all
        see `prefix` served. Each worker swaps in a reload on its own, a moment apart: that
        one worker serves the new config says nothing yet of the other."""
        return all(gw.serves(prefix) for _ in range(12 if workers else 1))

    def all_serve(*expected: str, absent: str) -> None:
        """Over new connections, so that with workers every one of them answers some."""
        before = [requests_counted_by_worker(pid, scratch) for pid in workers or []]
        for _ in range(12 if workers else 1):
            for prefix in expected:
                assert gw.serves(prefix), prefix
            assert gw.status(absent) == 404
        after = [requests_counted_by_worker(pid, scratch) for pid in workers or []]
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

    assert gw.status("alpha") == 404
    assert gw.reloads() == {}

    # An edit is picked up by the watch within 2 s, in every worker, and counted once.
    started = time.monotonic()
    gw.write("shop", "alpha")
    wait_for(lambda: every_worker_serves("alpha"), 2.0, "the edited config serves")
    assert time.monotonic() - started < 2.0
    all_serve("shop", "alpha", absent="beta")
    settle()
    assert gw.reloads() == {("ok",): 1}

    # SIGHUP loads an edit the watch cannot see, at once.
    gw.write("shop", "omega", keep_stat=True)
    started = time.monotonic()
    gw.process.signal(signal.SIGHUP)
    wait_for(lambda: every_worker_serves("omega"), 1.0, "SIGHUP loaded the edit")
    assert time.monotonic() - started < 1.0
    all_serve("shop", "omega", absent="alpha")
    assert gw.reloads() == {("ok",): 2}

    # A visible edit with a SIGHUP right after it is one reload, not one for each.
    gw.write("shop", "omega", "beta")
    gw.process.signal(signal.SIGHUP)
    wait_for(lambda: every_worker_serves("beta"), 1.0, "SIGHUP loaded the edit")
    settle()
    assert gw.reloads() == {("ok",): 3}

    # A setting only a restart applies: the reload is accepted, and the log says what it did
    # not apply, once (the supervisor says it for all its workers).
    # Here: a storage that does not answer, which every worker must go on ignoring, one
    # started after the reload included.
    server_file = gw.api_file.parent / SERVER_FILE
    dead = f"url: redis://127.0.0.1:{gw.closed}/0"
    server_file.write_text(re.sub(r"url: \S+", dead, server_file.read_text()))
    wait_for(lambda: gw.reloads().get(("ok",)) == 4, 2.0, "the server edit reloaded")
    settle()
    warning = "config reloaded, but storage.url only changes at the next start"
    assert gw.process.stderr().count(warning) == 1, gw.process.stderr()
    all_serve("shop", "omega", "beta", absent="alpha")

    # An invalid value: logged with file and line, counted, and the running config stays.
    gw.write("shop", "gamma", plan="rate: {limit: 5, per: fortnight}")
    wait_for(lambda: gw.reloads().get(("error",)) == 1, 2.0, "the bad edit counted")
    all_serve("shop", "omega", "beta", absent="gamma")
    assert re.search(
        r"10-api\.yaml:\d+: plans\.open\.rate\.per: must be one of", gw.process.stderr()
    ), gw.process.stderr()

    # Invalid YAML, by SIGHUP: the same.
    gw.api_file.write_text(gw.api_file.read_text().replace("fortnight}", "fortnight"))
    gw.process.signal(signal.SIGHUP)
    wait_for(lambda: gw.reloads().get(("error",)) == 2, 1.0, "the broken YAML counted")
    settle()
    assert gw.reloads() == {("ok",): 4, ("error",): 2}
    all_serve("shop", "omega", "beta", absent="gamma")

    # Counters survived every reload: each request sent so far is counted.
    assert gw.requests_counted() == gw.sent


def test_one_process_reloads_on_edit_and_sighup_and_keeps_a_good_config(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "config", "memory://", workers=None)
    try:
        gw.process.start(gw.proxy_port, gw.admin_port)
        check_reloads(gw, workers=None, scratch=tmp_path)
    finally:
        assert gw.process.stop() == 0, gw.process.stderr()
        gw.process.close()


def test_two_workers_reload_together_and_the_supervisor_counts_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    gw = Gateway(tmp_path / "config", redis_server.url, workers=2)
    try:
        gw.process.start(gw.proxy_port, gw.admin_port)
        workers = serving_workers(gw.process, 2)
        for _ in range(20):  # give each worker a counter file of its own
            gw.status("warmup")
        check_reloads(gw, workers=workers, scratch=tmp_path)

        # A worker that dies is replaced by one that serves the reloaded config.
        os.kill(workers[0], signal.SIGKILL)
        replacement = wait_for(
            lambda: [pid for pid in serving_workers(gw.process, 2) if pid not in workers],
            10,
            "a replacement worker",
        )[0]
        for _ in range(12):
            assert gw.serves("beta")
            assert gw.status("alpha") == 404
        assert requests_counted_by_worker(replacement, tmp_path) > 0
        # The dead worker's counts are still in the sum; only its in-flight gauge went.
        assert gw.requests_counted() == gw.sent
        assert scrape(gw.admin_port).series("gateway_inflight_requests") == {(): 0}
        assert gw.reloads() == {("ok",): 4, ("error",): 2}

        # Every worker, the replacement too, still limits on the Redis it started with, not the
        # dead one the files name since the reload: a rated route gets past the limits to the
        # (closed) upstream, 502, where the dead storage would make it 503.
        rated = gw.api_text("shop", "omega", "beta", plan="rate: {limit: 100000, per: second}")
        gw.api_file.write_text(rated.replace("routes:\n", 'routes:\n      - {path: "/live/x"}\n'))
        wait_for(lambda: gw.reloads().get(("ok",)) == 5, 2.0, "the rated route reloaded")
        settle()
        key = {"X-API-Key": "reload-secret"}
        assert {call(gw.proxy_port, "/live/x", headers=key).status for _ in range(12)} == {502}
    finally:
        assert gw.process.stop() == 0, gw.process.stderr()
        gw.process.close()


def test_a_sighup_while_workers_start_is_neither_fatal_nor_lost(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    gw = Gateway(tmp_path / "config", redis_server.url, workers=2)
    gw.write("shop", "omega")
    starting = threading.Thread(target=gw.process.start, args=(gw.proxy_port, gw.admin_port))
    starting.start()
    try:
        wait_for(lambda: gw.process.proc, 5, "the process started")
        assert gw.process.proc is not None
        supervisor = gw.process.proc.pid
        # Forked moments ago, the workers are still importing and binding, before their own
        # SIGHUP handler is in place: the SIGHUP they are handed must wait for it, not kill.
        forked = wait_for(
            lambda: len(children_of(supervisor)) == 2 and children_of(supervisor),
            5,
            "two workers forked",
        )
        gw.write("shop", "alpha", keep_stat=True)
        os.kill(supervisor, signal.SIGHUP)
        starting.join()

        assert sorted(serving_workers(gw.process, 2)) == forked
        assert "exited with" not in gw.process.stderr()
        for _ in range(24):
            assert gw.serves("alpha")
        # Both served some of those (the startup probe is one request of one of them).
        assert all(requests_counted_by_worker(pid, tmp_path) > 1 for pid in forked)
        assert gw.reloads() == {("ok",): 1}
    finally:
        starting.join()
        assert gw.process.stop() == 0, gw.process.stderr()
        gw.process.close()


async def test_a_reload_lets_the_keys_of_the_started_config_go(tmp_path: Path) -> None:
    """A worker keeps what only a restart changes of the config it started with, not its keys:
    held for the process's life, they were a second set of keys in memory after the first
    reload (100,000 file keys: 156 MB grew to 243 MB)."""
    keys = "".join(
        f"  - {{name: customer-{index}, key: secret-{index}, plans: {{shop: open}}}}\n"
        for index in range(50)
    )
    api = API.format(closed=closed_port(), routes='      - {path: "/shop/{rest:path}"}', plan="")
    config_dir = write_config(tmp_path / "config", api + keys, server=worker_server_yaml())
    # No name of this frame holds the config: only the worker does, as in `gateway run`.
    worker = Worker(str(config_dir), load_config(config_dir, env={}), supervised=False)
    await worker.start()
    try:
        started_keys = worker.runtime.snapshot.config.keys
        assert len(started_keys) == 51
        await worker.reload_now()
        assert worker.runtime.snapshot.config.keys is not started_keys
        # Ours (and getrefcount's argument) are the only references left.
        assert sys.getrefcount(started_keys) == 2, gc.get_referrers(started_keys)
    finally:
        await worker.drain()
