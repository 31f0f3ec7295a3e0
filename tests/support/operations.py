"""Helpers for tests that drive a real `gateway run` process from plain (blocking) test code.

The upstream runs in a thread with its own event loop, so the test itself can block on sockets,
signals and subprocesses without starving it.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from tests.support.answers import Answer
from tests.support.config import server_yaml, write_config
from tests.support.processes import GatewayProcess
from tests.support.sockets import free_ports
from tests.support.upstream import Upstream, running_upstream

T = TypeVar("T")

SECRET = "ops-secret-key-0042"
# A product whose routes pass anything under /soccer/ to `upstream`, and one key for it.
OPERATIONS_API = """
products:
  soccer:
    upstream: {{url: "{upstream}/base", timeout: 5s}}
    routes:
      - path: /soccer/{{rest:path}}
plans:
  open: {{}}
keys:
  - {{name: ops-user, key: {secret}, plans: {{soccer: open}}}}
"""


def write_config_on_free_ports(
    directory: Path, upstream_url: str, storage_url: str
) -> tuple[int, int]:
    """The operations config in `directory`; returns the proxy and admin ports it names."""
    proxy_port, admin_port = free_ports(2)
    write_config(
        directory,
        OPERATIONS_API.format(upstream=upstream_url, secret=SECRET),
        server=server_yaml(proxy_port, admin_port, storage_url),
    )
    return proxy_port, admin_port


Labels = tuple[tuple[str, str], ...]


def call(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> Answer:
    """One request over a new connection, closed afterwards; the whole answer is read."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers={"Connection": "close", **(headers or {})})
        response = connection.getresponse()
        return Answer(response.status, CIMultiDict(response.getheaders()), response.read())
    finally:
        connection.close()


class Scrape:
    """One /metrics answer, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                self.values.setdefault(sample.name, {})[labels] = sample.value

    def series(self, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
        """{label values in `label_names` order: value} of every sample called `name`."""
        found: dict[tuple[str, ...], float] = {}
        for labels, value in self.values.get(name, {}).items():
            named = dict(labels)
            found[tuple(named[label] for label in label_names)] = value
        return found

    def total(self, name: str) -> float:
        return sum(self.values.get(name, {}).values())


def scrape(admin_port: int) -> Scrape:
    answer = call(admin_port, "/metrics")
    assert answer.status == 200, answer
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(answer.body.decode())


def wait_for(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


_SERVING = re.compile(r"worker (\d+) serving")


def serving_workers(gateway: GatewayProcess, count: int, timeout: float = 15.0) -> list[int]:
    """The pids of `count` workers that have logged that they serve (their signal handlers are
    installed by then), each a child of the gateway's supervisor process."""
    assert gateway.proc is not None
    supervisor = gateway.proc.pid

    def alive_children() -> list[int] | None:
        pids = [int(pid) for pid in _SERVING.findall(gateway.stderr())]
        live = [pid for pid in dict.fromkeys(pids) if parent_of(pid) == supervisor]
        return live if len(live) >= count else None

    return wait_for(alive_children, timeout, f"{count} workers serving")[-count:]


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, parent, ...); the name in
    parentheses may hold spaces, the fields after it do not. OSError once the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def parent_of(pid: int) -> int | None:
    """The parent of a running process; None once it has exited (a zombie included)."""
    try:
        state, parent = _stat_fields(pid)[:2]
    except OSError:
        return None
    return None if state in ("Z", "X") else int(parent)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a running process."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """The running child processes of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_of(int(entry.name)) == pid:
            found.append(int(entry.name))
    return sorted(found)


def metrics_dir_of(pid: int) -> Path:
    """The PROMETHEUS_MULTIPROC_DIR a worker writes into, from its own counter file among the
    files it has mapped (a forked worker also maps its supervisor's until it counts)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        found = re.search(rf"(/\S+)/counter_{pid}\.db$", line)
        if found:
            return Path(found.group(1))
    raise AssertionError(f"worker {pid} has mapped no counter file (has it counted anything?)")


def requests_counted_by_worker(pid: int, scratch: Path) -> float:
    """One worker's own share of gateway_requests_total, read from its file alone."""
    alone = scratch / f"worker-{pid}-{time.monotonic_ns()}"
    alone.mkdir()
    source = metrics_dir_of(pid) / f"counter_{pid}.db"
    shutil.copy(source, alone / source.name)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, str(alone))  # type: ignore[no-untyped-call]
    return Scrape(generate_latest(registry).decode()).total("gateway_requests_total")


def connection_refused(port: int) -> bool:
    """Whether a new connection to `port` is refused; False (ask again) for one that was
    reset: on a busy box a connect can land in the backlog of a listener closing that very
    moment, which the kernel then resets."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False


class ThreadedUpstream:
    """tests.support.upstream's server, in a thread of its own for blocking tests."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="upstream", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._server: Upstream | None = None

    def __enter__(self) -> Upstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the upstream did not start")
        assert self._server is not None
        return self._server

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with running_upstream() as server:
            self._server = server
            self._ready.set()
            await self._stop.wait()
