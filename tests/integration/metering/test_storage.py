"""Metering and its storage, end to end: real requests through a gateway to a real upstream
and the usage API on its admin port. With on_error: local each process (and each of two
workers) admits its share while a Redis is killed and restarted, and refunds after the restart
neither go negative nor twice; a single Redis sees one round trip per request, two when
refunded, one for a credit.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.config import write_config
from tests.support.metering_rig import API, Rig, _running_rig, eventually
from tests.support.operations import serving_workers
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.sockets import free_ports
from tests.support.upstream import Upstream, running_upstream


async def test_storage_away_with_on_error_local(
    tmp_path: Path, fresh_redis_server: RedisServer
) -> None:
    # local_fraction 0.5 of a rate of 5 per 10 s: 3 per window in this process.
    async with _running_rig(tmp_path, storage_url=fresh_redis_server.url, on_error="local") as rig:
        before = await rig.metrics()
        assert [(await rig.get("local", "/soccer/a"))[0] for _ in range(2)] == [200, 200]
        fresh_redis_server.stop()
        answers = [await rig.get("local", "/soccer/a") for _ in range(6)]
        local = math.ceil(5 * 0.5)
        assert [status for status, _, _ in answers] == [200] * local + [429] * (6 - local)
        assert answers[-1][2]["code"] == "throttled"
        assert answers[0][1]["X-RateLimit-Limit"] == str(local)
        samples = await rig.metrics()
        for decision, count in (("local_allowed", local), ("local_throttled", 6 - local)):
            labels = frozenset({("product", "soccer"), ("plan", "local"), ("decision", decision)})
            series = ("gateway_limit_decisions_total", labels)
            assert samples[series] - before.get(series, 0) == count
        # A plan with a quota is not checked against it meanwhile, and its answers say
        # nothing of it (the storage that knows what is left is away).
        status, headers, _ = await rig.get("count", "/soccer/a")
        assert status == 200
        assert not [name for name in headers if name.startswith(("X-Quota", "RateLimit"))]

        fresh_redis_server.start()
        # The shared limit again, at once: its window starts empty (the restarted Redis
        # kept nothing), and it is the plan's whole limit.
        await eventually(lambda: _status(rig, "local"), 200)
        statuses = [(await rig.get("local", "/soccer/a"))[0] for _ in range(5)]
        assert statuses == [200] * 4 + [429]
        assert (await rig.get("local", "/soccer/a"))[1]["X-RateLimit-Limit"] == "5"


async def _status(rig: Rig, key: str) -> int:
    return (await rig.get(key, "/soccer/a"))[0]


async def test_refunds_after_a_redis_restart_neither_go_negative_nor_twice(
    tmp_path: Path, fresh_redis_server: RedisServer
) -> None:
    async with _running_rig(
        tmp_path, storage_url=fresh_redis_server.url, storage_timeout="2s"
    ) as rig:
        # Three failures in flight, their units taken...
        failing = [
            asyncio.create_task(rig.get("refund", "/soccer/slow?for=0.25&status=500"))
            for _ in range(3)
        ]
        await eventually(lambda: _slow_in_flight(rig.upstream), 3)
        assert await rig.used("refund") == 3
        # ...when Redis restarts and loses them; their refunds come after.
        fresh_redis_server.stop()
        fresh_redis_server.start()
        assert sorted(status for status, _, _ in await asyncio.gather(*failing)) == [500] * 3
        # Nothing to give back to: no negative count, and a request admitted now counts.
        await eventually(lambda: _status(rig, "refund"), 200)
        await asyncio.sleep(0.1)  # time for any (wrong) refund to land
        assert await rig.used("refund") == 1
        samples = await rig.metrics()
        ok = (
            "gateway_quota_refunds_total",
            frozenset({("product", "soccer"), ("plan", "refunding"), ("result", "ok")}),
        )
        error = (ok[0], frozenset({*ok[1] - {("result", "ok")}, ("result", "error")}))
        # Each refund was tried once: taken (finding nothing) or failed, never repeated.
        assert samples.get(ok, 0) + samples.get(error, 0) >= 3


async def _slow_in_flight(upstream: Upstream) -> int:
    return upstream.slow_in_flight


async def test_each_of_two_workers_admits_its_local_share(
    tmp_path: Path, fresh_redis_server: RedisServer
) -> None:
    run = uuid.uuid4().hex[:8]
    proxy_port, admin_port = free_ports(2)
    async with running_upstream() as upstream:
        server = (
            f"server: {{listen: 127.0.0.1:{proxy_port}, admin_listen: 127.0.0.1:{admin_port}}}\n"
            f"storage: {{url: {fresh_redis_server.url}, timeout: 250ms, on_error: local,"
            " local_fraction: 0.5}\n"
        )
        config = write_config(
            tmp_path / "c",
            # The stream product's upstream is never asked here.
            API.format(upstream=upstream.url, trailing="http://127.0.0.1:9", run=run),
            server=server,
        )
        gateway = GatewayProcess(config, workers=2)
        try:
            await asyncio.to_thread(gateway.start, proxy_port, admin_port)
            # Both must listen before the count: start() returns once the first one answers.
            await asyncio.to_thread(serving_workers, gateway, 2)
            # A new connection per request, so that the kernel spreads them over both workers.
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as http:
                url = f"http://127.0.0.1:{proxy_port}/soccer/a"
                headers = {"X-API-Key": f"local-{run}"}
                fresh_redis_server.stop()
                statuses = []
                for _ in range(40):
                    async with http.get(url, headers=headers) as response:
                        statuses.append(response.status)
            # ceil(5 * 0.5) = 3 in each of the two processes, within the one 10 s window.
            assert statuses.count(200) == 2 * math.ceil(5 * 0.5)
            assert statuses.count(429) == 40 - 6
        finally:
            assert await asyncio.to_thread(gateway.stop) == 0, gateway.stderr()
            gateway.close()


@pytest.fixture
def single_redis(rig: Rig, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A client of the rig's Redis, for its command counts: a single Redis only."""
    if not rig.worker.config.storage.url.startswith("redis://"):
        pytest.skip("round trips are counted on a single Redis")
    client = request.getfixturevalue("redis_server").client()
    yield client
    client.close()


async def test_round_trips_one_per_request_two_when_refunded(rig: Rig, single_redis: Any) -> None:
    """One EVALSHA per admitted request; a refunded one adds exactly one more (the refund)."""
    redis_client = single_redis
    await rig.get("bill", "/soccer/warm-up")  # the subscription's first admission of the day
    await rig.used_becomes("bill", 1)
    redis_client.config_resetstat()
    for _ in range(10):
        assert (await rig.get("bill", "/soccer/status/200"))[0] == 200
    for _ in range(10):
        assert (await rig.get("bill", "/soccer/status/500"))[0] == 500
    await rig.used_becomes("bill", 11)  # the ten 500s given back
    stats = redis_client.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {}).get("calls", 0)
    assert evalsha == 10 + 10 * 2, stats


async def test_credit_answers_with_the_usage_it_made(rig: Rig, single_redis: Any) -> None:
    """The credit's own reply is the answer's quota: no usage read after it."""
    redis_client = single_redis
    assert (await rig.get("vip", "/soccer/x"))[0] == 200
    redis_client.config_resetstat()
    credit_url = rig.admin(f"/admin/usage/vip-{rig.run}/soccer/credit")
    async with rig.http.post(credit_url, json={"amount": 4}) as response:
        assert response.status == 200
        quota = (await response.json())["products"]["soccer"]["quota"]
    stats = redis_client.info("commandstats")
    assert (quota["limit"], quota["used"], quota["credit"]) == (7, 1, 4)
    # The credit script ran (its HINCRBY); no HMGET of the quota's hash came after it.
    assert stats["cmdstat_hincrby"]["calls"] == 1, stats
    assert stats.get("cmdstat_hmget", {}).get("calls", 0) == 0, stats
