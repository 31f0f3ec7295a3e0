"""CPU time per hit of the limit step (limiter.hit + limit_headers), memory and Redis storage.

Starts its own redis-server (from PATH) on a free loopback port, runs N hits against each
storage sequentially and from many concurrent tasks (which exercises the Redis batching), and
prints this process's CPU microseconds per hit (the redis-server's own CPU is not counted:
it is the gateway's cost that matters). Plans admit everything, like the throughput benchmark:
rate 1e8/second, quota 1e12/month in Europe/Berlin.

    .venv/bin/python bench/limiter_micro.py [--hits 20000] [--tasks 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config.model import QuotaRule, RateRule, StorageConfig
from gateway.limits import Limiter, create_limiter
from gateway.limits.headers import limit_headers

RATE = RateRule(limit=100_000_000, window=1.0, per="second")
QUOTA = QuotaRule(limit=1_000_000_000_000, per="month", timezone=ZoneInfo("Europe/Berlin"))
SUBJECTS = [f"key-{i}:bench" for i in range(100)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return server, port
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("redis-server did not start")


async def one_hit(limiter: Limiter, subject: str) -> None:
    decision = await limiter.hit(subject, RATE, QUOTA)
    limit_headers(decision)


async def sequential(limiter: Limiter, hits: int) -> None:
    subjects = SUBJECTS
    count = len(subjects)
    for i in range(hits):
        await one_hit(limiter, subjects[i % count])


async def concurrent(limiter: Limiter, hits: int, tasks: int) -> None:
    async def worker(offset: int) -> None:
        subjects = SUBJECTS
        count = len(subjects)
        for i in range(hits // tasks):
            await one_hit(limiter, subjects[(offset + i) % count])

    await asyncio.gather(*(worker(t) for t in range(tasks)))


async def measure(run: Callable[[], Awaitable[None]], hits: int) -> tuple[float, float]:
    """(CPU µs per hit, wall µs per hit) of one run."""
    cpu, wall = time.process_time(), time.perf_counter()
    await run()
    return (time.process_time() - cpu) / hits * 1e6, (time.perf_counter() - wall) / hits * 1e6


async def bench(url: str, hits: int, tasks: int, rounds: int) -> dict[str, tuple[float, float]]:
    limiter = create_limiter(StorageConfig(url=url, timeout=2.0))
    try:
        await sequential(limiter, 2000)  # connect, load the script, warm caches
        best: dict[str, tuple[float, float]] = {}
        for _ in range(rounds):
            runs: dict[str, Callable[[], Awaitable[None]]] = {
                "sequential": lambda: sequential(limiter, hits),
                f"{tasks} tasks": lambda: concurrent(limiter, hits, tasks),
            }
            for name, run in runs.items():
                result = await measure(run, hits)
                if name not in best or result[0] < best[name][0]:
                    best[name] = result
        return best
    finally:
        await limiter.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many")
    parser.add_argument("--only", choices=["memory", "redis"], default=None)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        server, port = start_redis(directory)
        try:
            urls = {"memory": "memory://", "redis": f"redis://127.0.0.1:{port}/0"}
            print(f"{'storage':8} {'load':10} {'CPU µs/hit':>11} {'wall µs/hit':>12}")
            for storage, url in urls.items():
                if options.only not in (None, storage):
                    continue
                results = uvloop.run(bench(url, options.hits, options.tasks, options.rounds))
                for load, (cpu, wall) in results.items():
                    print(f"{storage:8} {load:10} {cpu:11.2f} {wall:12.2f}")
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
