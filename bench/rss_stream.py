"""How much memory the gateway needs to proxy one large response.

nginx serves a sparse file of --mb MiB (created with truncate, so it costs no disk) through the
gateway (memory storage, one worker). While a client downloads it in chunks, the gateway's VmRSS is
sampled every 50 ms; a gateway that streams keeps it flat, one that buffers grows by the file size.

    .venv/bin/python bench/rss_stream.py [--mb 1024] [--keep]
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness import (
    KEY_HEADER,
    BenchError,
    GatewayPorts,
    Procs,
    bench_workspace,
    free_port,
    raise_on_sigterm,
    require_tools,
    rss_kib,
    start_gateway,
    start_upstream,
    write_gateway_config,
)

MIB = 1024 * 1024
SAMPLE_EVERY = 0.05
FILE_PATH = "/bench/files/big.bin"


@dataclass(frozen=True)
class RssResult:
    size_mb: int
    received: int
    baseline_mb: float
    peak_mb: float
    seconds: float

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.baseline_mb

    @property
    def throughput_mb_s(self) -> float:
        return self.received / MIB / self.seconds


class PeakSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kib = rss_kib(pid)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_EVERY):
            self.peak_kib = max(self.peak_kib, rss_kib(self.pid))

    def finish(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
        return self.peak_kib


def download(port: int, path: str, expected: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers=KEY_HEADER)
        response = conn.getresponse()
        if response.status != 200:
            raise BenchError(f"download: status {response.status}: {response.read(300)!r}")
        length = response.getheader("Content-Length")
        if length is not None and int(length) != expected:
            raise BenchError(f"download: Content-Length {length}, expected {expected}")
        received = 0
        while chunk := response.read(256 * 1024):
            received += len(chunk)
        return received
    finally:
        conn.close()


def measure_rss(procs: Procs, tmp: Path, size_mb: int) -> RssResult:
    """Start an upstream nginx and a gateway in `tmp`, proxy one response of `size_mb` MiB."""
    upstream_port = free_port()
    ports = GatewayPorts(free_port(), free_port())
    upstream = start_upstream(procs, tmp, upstream_port)
    gateway = None
    try:
        big = tmp / "www" / "bench" / "big.bin"
        with big.open("wb") as handle:
            handle.truncate(size_mb * MIB)
        config = write_gateway_config(tmp / "gw-rss.yaml", ports, "memory://", upstream_port)
        gateway = start_gateway(procs, tmp, "gateway-rss", config, ports.proxy)
        # Warm up the gateway's upstream client with a small streamed body first, so the
        # baseline already includes everything a first request allocates.
        download(ports.proxy, "/bench/ok", len(b'{"ok":true}'))
        baseline = rss_kib(gateway.popen.pid)
        sampler = PeakSampler(gateway.popen.pid)
        sampler.start()
        affinity = os.sched_getaffinity(0)
        if (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(
                0, {1}
            )  # the client runs beside the upstream, off the proxy's core
        started = time.perf_counter()
        try:
            received = download(ports.proxy, FILE_PATH, size_mb * MIB)
        finally:
            os.sched_setaffinity(0, affinity)
            peak = sampler.finish()
        seconds = time.perf_counter() - started
        if received != size_mb * MIB:
            raise BenchError(f"received {received} bytes, expected {size_mb * MIB}")
        return RssResult(size_mb, received, baseline / 1024, peak / 1024, seconds)
    finally:
        if gateway is not None:
            procs.stop(gateway)
        procs.stop(upstream)


def report_lines(result: RssResult) -> list[str]:
    return [
        f"proxied {result.received:,} bytes ({result.size_mb} MiB) in {result.seconds:.1f} s "
        f"= {result.throughput_mb_s:.0f} MiB/s",
        f"gateway VmRSS baseline {result.baseline_mb:.1f} MiB, peak {result.peak_mb:.1f} MiB, "
        f"growth {result.growth_mb:.1f} MiB",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="response size in MiB (1024)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    args = parser.parse_args()
    require_tools(["nginx", "taskset"])
    raise_on_sigterm()
    with bench_workspace("gateway-rss-", args.keep) as procs:
        try:
            result = measure_rss(procs, procs.logs, args.mb)
        except BenchError as exc:
            print(f"rss_stream: {exc}", file=sys.stderr)
            return 1
    print("\n".join(report_lines(result)))
    verdict = "PASS" if result.growth_mb < 32 else "FAIL"
    print(f"{verdict}: RSS growth while proxying {result.size_mb} MiB < 32 MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
