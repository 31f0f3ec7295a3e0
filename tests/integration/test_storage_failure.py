"""The limit storage failing under a running gateway: a killed or a frozen redis-server.

A few clients keep asking through the whole test while Redis is killed (or frozen) and brought
back; every answer is timed. `on_error: deny` must answer 503 storage_unavailable within
`storage.timeout`, and admit again once Redis is back, without restarting the gateway;
`on_error: allow` must keep admitting. /readyz follows the storage.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from gateway.server import Worker
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.redis_servers import RedisServer
from tests.support.sockets import free_port
from tests.support.upstream import Upstream, running_upstream

STORAGE_TIMEOUT = 0.25
# What an answer may take beyond the storage timeout: the client shares the test's event loop
# with the gateway on a busy 2-core machine.
LATENCY_MARGIN = 0.25
OUTAGE_SECONDS = 0.8
RECOVERY_LIMIT_SECONDS = 5.0

API = """
products:
  soccer:
    upstream: {{url: "{upstream}/base"}}
    routes:
      - path: /soccer/{{rest:path}}
plans:
  metered:
    rate: {{limit: 100000, per: second}}
    quota: {{limit: 1000000, per: day}}
  pay-as-you-go: {{}}
keys:
  - name: tester
    key: secret-1
    plans: {{soccer: metered}}
  - name: payg
    key: secret-payg
    plans: {{soccer: pay-as-you-go}}
"""
KEY = {"X-API-Key": "secret-1"}
LIMIT_HEADERS = ("RateLimit", "RateLimit-Policy", "X-RateLimit-Limit", "X-Quota-Limit")


@dataclass(frozen=True, slots=True)
class TimedAnswer:
    sent: float
    answered: float
    status: int
    code: str | None
    retry_after: str | None
    limit_headers: bool

    @property
    def latency(self) -> float:
        return self.answered - self.sent


@dataclass
class Clients:
    """Clients that keep asking until stopped, each answer timed."""

    url: str
    answers: list[TimedAnswer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, count: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            await asyncio.gather(*(self._ask(session) for _ in range(count)))

    async def _ask(self, session: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                async with session.get(self.url, headers=KEY) as response:
                    body = await response.read()
                    code = None
                    if response.headers.get("Content-Type") == "application/problem+json":
                        code = json.loads(body)["code"]
                    self.answers.append(
                        TimedAnswer(
                            sent,
                            time.monotonic(),
                            response.status,
                            code,
                            response.headers.get("Retry-After"),
                            any(name in response.headers for name in LIMIT_HEADERS),
                        )
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.errors.append(repr(exc))
            await asyncio.sleep(0.01)

    def between(self, start: float, end: float) -> list[TimedAnswer]:
        """The answers to requests sent at or after `start` and answered before `end`."""
        return [a for a in self.answers if a.sent >= start and a.answered < end]

    def sent_after(self, start: float) -> list[TimedAnswer]:
        return [a for a in self.answers if a.sent >= start]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with running_upstream() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# How Redis fails, and how it comes back: killed (connections refused, then a new process
# with an empty script cache) or frozen (connections stay open and nothing answers).
FAILURES: dict[str, tuple[Callable[[RedisServer], None], Callable[[RedisServer], None]]] = {
    "killed": (RedisServer.stop, RedisServer.start),
    "frozen": (RedisServer.pause, RedisServer.resume),
}


@dataclass
class Run:
    """What happened around the outage, as time.monotonic() marks."""

    clients: Clients
    breaking: float = 0.0  # just before the failure was caused
    broken: float = 0.0  # once it had been caused
    repairing: float = 0.0
    readyz_down: list[tuple[int, float]] = field(default_factory=list)  # status, latency
    readyz_after: int = 0


async def run_through_outage(
    gateway: Worker, redis: RedisServer, http: aiohttp.ClientSession, failure: str
) -> Run:
    """Clients ask all along; Redis fails for OUTAGE_SECONDS, comes back, and is used again."""
    fail, repair = FAILURES[failure]
    run = Run(Clients(f"http://127.0.0.1:{gateway.proxy_port}/soccer/v1/items"))
    readyz = f"http://127.0.0.1:{gateway.admin_port}/readyz"
    load = asyncio.create_task(run.clients.run(4))
    try:
        await asyncio.sleep(0.3)
        run.breaking = time.monotonic()
        await asyncio.to_thread(fail, redis)
        run.broken = time.monotonic()
        outage_ends = run.broken + OUTAGE_SECONDS
        while time.monotonic() < outage_ends:
            asked = time.monotonic()
            async with http.get(readyz) as response:
                run.readyz_down.append((response.status, time.monotonic() - asked))
            await asyncio.sleep(0.1)
        run.repairing = time.monotonic()
        await asyncio.to_thread(repair, redis)
        deadline = run.repairing + RECOVERY_LIMIT_SECONDS
        while time.monotonic() < deadline:
            if any(a.status == 200 for a in run.clients.sent_after(run.repairing)):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # answers after the recovery, to show it holds
        ready_by = time.monotonic() + RECOVERY_LIMIT_SECONDS
        while run.readyz_after != 200 and time.monotonic() < ready_by:
            async with http.get(readyz) as response:
                run.readyz_after = response.status
    finally:
        run.clients.stop.set()
        await load
    return run


async def outage(
    tmp_path: Path,
    upstream: Upstream,
    redis: RedisServer,
    http: aiohttp.ClientSession,
    failure: str,
    on_error: str,
) -> Run:
    """A gateway on `redis` with `on_error`, run through one outage of the kind `failure`."""
    config = write_config(
        tmp_path / "config",
        API.format(upstream=upstream.url),
        server=worker_server_yaml(
            storage_url=redis.url,
            storage_timeout=f"{STORAGE_TIMEOUT * 1000:.0f}ms",
            on_error=on_error,
        ),
    )
    async with running_gateway(config) as gateway:
        run = await run_through_outage(gateway, redis, http, failure)
    report(run, failure, on_error)
    return run


def check_readyz(run: Run) -> None:
    assert run.readyz_down, "no /readyz during the outage"
    for status, latency in run.readyz_down:
        assert status == 503
        assert latency <= STORAGE_TIMEOUT + LATENCY_MARGIN
    assert run.readyz_after == 200


def report(run: Run, failure: str, on_error: str) -> None:
    during = run.clients.between(run.broken, run.repairing)
    slowest = max((a.latency for a in during), default=0.0)
    admitted_again = [a for a in run.clients.sent_after(run.repairing) if a.status == 200]
    recovery = admitted_again[0].answered - run.repairing if admitted_again else float("inf")
    print(
        f"\n[{failure}, on_error: {on_error}] {len(run.clients.answers)} answers; during the "
        f"outage {len(during)} answers {sorted({a.status for a in during})}, slowest "
        f"{slowest * 1000:.0f} ms (storage.timeout {STORAGE_TIMEOUT * 1000:.0f} ms); "
        f"first admission {recovery * 1000:.0f} ms after the restart began"
    )


@pytest.mark.parametrize("failure", sorted(FAILURES))
async def test_deny_answers_503_within_the_timeout_and_recovers_by_itself(
    tmp_path: Path,
    upstream: Upstream,
    fresh_redis_server: RedisServer,
    http: aiohttp.ClientSession,
    failure: str,
) -> None:
    run = await outage(tmp_path, upstream, fresh_redis_server, http, failure, "deny")
    answers = run.clients.answers
    assert run.clients.errors == []
    assert {(a.status, a.code) for a in answers} == {(200, None), (503, "storage_unavailable")}
    assert all(a.status == 200 for a in answers if a.answered < run.breaking)

    during = run.clients.between(run.broken, run.repairing)
    assert len(during) >= 3
    for answer in during:
        assert (answer.status, answer.code) == (503, "storage_unavailable")
        assert answer.latency <= STORAGE_TIMEOUT + LATENCY_MARGIN
    for answer in answers:
        if answer.status == 503:
            assert answer.retry_after is not None and int(answer.retry_after) >= 1
            assert not answer.limit_headers  # step 7 never answered

    # Back without a restart: once one request is admitted again, all the later ones are.
    after = run.clients.sent_after(run.repairing)
    recovered = next(a for a in after if a.status == 200)
    assert recovered.sent - run.repairing < RECOVERY_LIMIT_SECONDS
    relapsed = [a for a in after if a.sent >= recovered.answered and a.status != 200]
    assert relapsed == []
    assert sum(1 for a in after if a.sent >= recovered.answered) >= 3
    check_readyz(run)
    if failure == "frozen":
        # Exact billing: the frozen Redis ran the hits written to it when it woke, after their
        # deadlines on its clock; the requests they were for were answered 503, and they took
        # nothing. Only the 200s are in the quota, and in the day's history.
        # (Unless Redis ran a hit and froze before writing its reply: only a request sent
        # before the freeze began can be one of those.)
        admitted = sum(1 for a in answers if a.status == 200)
        racing = sum(1 for a in answers if a.status == 503 and a.sent < run.broken)
        client = fresh_redis_server.client()
        quota = client.keys("gw:{tester:soccer}:q:*")
        used = sum(int(client.hget(key, "used") or 0) for key in quota)
        days = client.keys("gw:{tester:soccer}:d:*")
        counted = sum(int(client.hget(key, "r:metered") or 0) for key in days)
        assert admitted <= used <= admitted + racing, (used, admitted, racing)
        assert counted == used


@pytest.mark.parametrize("failure", sorted(FAILURES))
async def test_allow_keeps_admitting_while_redis_is_down(
    tmp_path: Path,
    upstream: Upstream,
    fresh_redis_server: RedisServer,
    http: aiohttp.ClientSession,
    failure: str,
) -> None:
    run = await outage(tmp_path, upstream, fresh_redis_server, http, failure, "allow")
    answers = run.clients.answers
    assert run.clients.errors == []
    assert {a.status for a in answers} == {200}
    # Every admitted request, those of the outage included, reached the upstream.
    assert len(upstream.seen) == len(answers)

    during = run.clients.between(run.broken, run.repairing)
    assert len(during) >= 3
    for answer in during:
        assert answer.latency <= STORAGE_TIMEOUT + LATENCY_MARGIN
        assert not answer.limit_headers  # admitted without a limit decision
    check_readyz(run)


@pytest.mark.parametrize(("on_error", "status"), [("deny", 503), ("allow", 200), ("local", 200)])
async def test_a_plan_without_limits_still_needs_the_storage_under_deny(
    tmp_path: Path, upstream: Upstream, http: aiohttp.ClientSession, on_error: str, status: int
) -> None:
    """Step 6 holds for every plan: a plan with nothing to enforce still has its requests
    counted in the history, so `deny` refuses them while the storage is away rather than
    admitting requests it cannot bill."""
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    server = worker_server_yaml(storage_url=closed, on_error=on_error)
    config = write_config(tmp_path, API.format(upstream=upstream.url), server=server)
    async with running_gateway(config) as gateway:
        url = f"http://127.0.0.1:{gateway.proxy_port}/soccer/v1/items"
        async with http.get(url, headers={"X-API-Key": "secret-payg"}) as response:
            body = await response.read()
            assert response.status == status, body
            if status == 503:
                assert json.loads(body)["code"] == "storage_unavailable"
                assert response.headers["Retry-After"]
    assert len(upstream.seen) == (1 if status == 200 else 0)


async def test_admin_calls_the_storage_times_out_are_counted(
    tmp_path: Path,
    upstream: Upstream,
    fresh_redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    """gateway_storage_errors_total counts the admin port's storage calls that time out, as it
    counts those refused: the admin's own bound on a call must not cut in before the
    storage's, which counts."""
    server = worker_server_yaml(storage_url=fresh_redis_server.url)
    config = write_config(tmp_path, API.format(upstream=upstream.url), server=server)
    async with running_gateway(config) as gateway:
        admin = f"http://127.0.0.1:{gateway.admin_port}"
        calls = [
            ("GET", "/readyz", "ping"),
            ("GET", "/admin/usage/tester", "usage"),
            ("DELETE", "/admin/usage/tester/soccer", "reset"),
        ]
        async with http.get(admin + "/readyz") as ready:
            assert ready.status == 200
        async with http.get(admin + "/metrics") as response:
            before = storage_errors(await response.text())
        fresh_redis_server.pause()
        try:
            for method, path, _ in calls:
                async with http.request(method, admin + path) as response:
                    assert response.status == 503, path
        finally:
            fresh_redis_server.resume()
        async with http.get(admin + "/metrics") as response:
            after = storage_errors(await response.text())
    # (The registry is the test process's: earlier tests' errors are in `before`.)
    for _, _, operation in calls:
        assert after.get(operation, 0) - before.get(operation, 0) == 1, operation


def storage_errors(scrape: str) -> dict[str, float]:
    """gateway_storage_errors_total by operation, from a scrape."""
    found = re.findall(r'^gateway_storage_errors_total\{operation="([^"]+)"\} (\S+)$', scrape, re.M)
    return {operation: float(value) for operation, value in found}
