"""Each worker process's open files, their limit, memory and CPU, for /metrics.

prometheus-client's `process_*` metrics describe the process that answers the scrape, and
its multiprocess mode (several workers) has none at all: with `workers: 2` an operator could
not see a worker nearing its limit of open files, past which new clients are dropped (README,
"Open files"). So every scrape reports each worker, labelled by its number, from Linux's
/proc: the supervisor names its workers in a file of the metrics folder as it starts and
collects them (`name_workers`), and the worker answering the scrape reads the others' /proc
entries (processes of the same user may). Elsewhere than Linux, nothing is reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

WORKERS_FILE = "workers.txt"  # in the metrics folder: "pid index" lines (not *.db: not read as
# a metric file by prometheus-client)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def name_workers(directory: str, workers: Mapping[int, int]) -> None:
    """Write the supervisor's workers (pid -> index) to `directory`, replacing the last list
    in one step, so that a scrape never reads half of one."""
    path = os.path.join(directory, WORKERS_FILE)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="ascii") as out:
        out.writelines(f"{pid} {index}\n" for pid, index in sorted(workers.items()))
    os.replace(partial, path)


def named_workers(directory: str | None) -> dict[int, int]:
    """The workers to report (pid -> index): the supervisor's list, or this process alone."""
    if directory is None:
        return {os.getpid(): 0}
    try:
        text = Path(directory, WORKERS_FILE).read_text(encoding="ascii")
    except OSError:
        return {}
    workers: dict[int, int] = {}
    for line in text.splitlines():
        pid, _, index = line.partition(" ")
        if pid.isdigit() and index.isdigit():
            workers[int(pid)] = int(index)
    return workers


class WorkerStats(Collector):
    """The families `gateway_worker_*` for the workers `named_workers` gives."""

    def __init__(self, directory: str | None) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        open_fds = GaugeMetricFamily(
            "gateway_worker_open_fds", "Open file descriptors of each worker.", labels=["worker"]
        )
        max_fds = GaugeMetricFamily(
            "gateway_worker_max_fds",
            "Each worker's limit of open file descriptors (its soft limit).",
            labels=["worker"],
        )
        memory = GaugeMetricFamily(
            "gateway_worker_resident_memory_bytes",
            "Resident memory of each worker.",
            labels=["worker"],
        )
        cpu = CounterMetricFamily(
            "gateway_worker_cpu_seconds",
            "User and system CPU time of each worker since it started.",
            labels=["worker"],
        )
        for pid, index in sorted(named_workers(self._directory).items(), key=lambda w: w[1]):
            stats = _read(pid)
            if stats is None:  # gone since the list was written, or not Linux
                continue
            label = [str(index)]
            open_fds.add_metric(label, stats[0])
            if stats[1] is not None:
                max_fds.add_metric(label, stats[1])
            memory.add_metric(label, stats[2])
            cpu.add_metric(label, stats[3])
        yield from (open_fds, max_fds, memory, cpu)


def _read(pid: int) -> tuple[int, float | None, int, float] | None:
    """(open fds, their soft limit or None for unlimited, resident bytes, CPU seconds)."""
    proc = Path("/proc", str(pid))
    try:
        open_fds = sum(1 for _ in os.scandir(proc / "fd"))
        limit = _soft_limit(proc / "limits")
        # stat: "pid (comm) state ..." with comm in parentheses that may hold anything.
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    resident = int(fields[21]) * _PAGE_SIZE
    return open_fds, limit, resident, cpu


def _soft_limit(limits: Path) -> float | None:
    for line in limits.read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return None if soft == "unlimited" else float(soft)
    return None
