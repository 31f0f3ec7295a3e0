"""Two checkouts of the gateway against each other: CPU microseconds per request of the shipped
defaults (Redis, access log to a pipe read by `cat` on core 1), both gateways up at once on core
0, one Redis and the upstream nginx on core 1, `wrk -c50` alternating between them round by
round, so that both see the same machine. Each checkout needs only its sources (the gateway
runs under the bench's interpreter, with the checkout on PYTHONPATH).

    .venv/bin/python bench/ab.py --rounds 12 /path/to/base /path/to/this

Prints each checkout's median and its rounds. On a noisy machine single rounds spread by
+-15%: use many rounds before reading a difference of a few percent.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
from pathlib import Path

import harness
from interpreter import fastest_python

ROUND_SECONDS = 4


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(port: int, seconds: int) -> int:
    argv = [
        *harness.pinned(1), "wrk", "-t1", "-c50", f"-d{seconds}s",
        "-H", f"X-API-Key: {harness.API_KEY}", f"http://127.0.0.1:{port}/bench/ok",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    found = re.search(r"(\d+) requests in", out)
    if found is None:
        raise harness.BenchError(f"wrk said:\n{out}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("checkouts", nargs=2, type=Path)
    args = parser.parse_args()
    harness.require_tools(["nginx", "redis-server", "wrk", "cat", "taskset"])
    cache = Path.home() / ".cache" / "gateway-bench"
    python = fastest_python(cache).path
    with harness.bench_workspace("gateway-ab-") as procs:
        tmp = procs.logs
        upstream, redis = harness.free_port(), harness.free_port()
        harness.start_upstream(procs, tmp, upstream)
        harness.start_redis(procs, tmp, redis)
        gateways: list[tuple[Path, int, int]] = []
        for index, checkout in enumerate(args.checkouts):
            ports = harness.GatewayPorts(harness.free_port(), harness.free_port())
            storage = f"redis://127.0.0.1:{redis}/{index}"
            config = harness.write_gateway_config(tmp / f"{index}.yaml", ports, storage, upstream)
            _, stdout = harness.start_log_reader(procs, f"reader-{index}", tmp / f"{index}.log")
            env = {
                **os.environ,
                "PYTHONPATH": str(checkout.resolve()),
                "GATEWAY_ACCESS_LOG": "on",
            }
            argv = [*harness.pinned(0), python, "-m", "gateway", "run", "--config", str(config)]
            child = procs.start(f"gateway-{index}", argv, env=env, stdout=stdout)
            os.close(stdout)
            harness.wait_until_serving(child, ports.proxy)
            gateways.append((checkout, child.popen.pid, ports.proxy))
        for _, _, port in gateways:
            wrk(port, 1)  # warm-up
        results: dict[Path, list[float]] = {checkout: [] for checkout, _, _ in gateways}
        for round_ in range(args.rounds):
            for checkout, pid, port in gateways if round_ % 2 == 0 else gateways[::-1]:
                before = cpu_seconds(pid)
                requests = wrk(port, ROUND_SECONDS)
                results[checkout].append((cpu_seconds(pid) - before) / requests * 1e6)
    for checkout, rounds in results.items():
        each = " ".join(f"{value:.1f}" for value in rounds)
        print(f"{checkout}: median {statistics.median(rounds):.1f} CPU µs/request ({each})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
