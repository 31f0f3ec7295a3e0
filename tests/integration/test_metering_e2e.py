"""Metering end to end: real requests through a gateway to a real upstream, the usage API on
its admin port, for memory, a real redis-server and a real Redis Cluster; a Redis killed and
restarted for the local-limit case.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from gateway.server import Worker
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.operations import serving_workers
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.sockets import free_ports
from tests.support.upstream import Upstream, running_upstream

API = """
products:
  soccer:
    upstream: {{url: "{upstream}/base", timeout: 300ms}}
    routes:
      - path: /soccer/heavy/{{rest:path}}
        cost: 10
      - path: /soccer/{{rest:path}}
  weather:
    upstream: {{url: "{upstream}/base"}}
    routes:
      - path: /weather/{{rest:path}}
plans:
  refunding:
    quota: {{limit: 5, per: month, refund_on: [5xx, 499]}}
  counting:
    quota: {{limit: 5, per: month}}
  rated:
    rate: {{limit: 2, per: 10s}}
    quota: {{limit: 100, per: month, refund_on: [5xx]}}
  billing:
    quota: {{limit: 100, per: month, refund_on: [5xx]}}
  local:
    rate: {{limit: 5, per: 10s}}
  trial:
    rate: {{limit: 1, per: second}}
    quota: {{limit: 1000, per: month}}
keys:
  - {{name: refund-{run}, key: refund-{run}, plans: {{soccer: refunding}}}}
  - {{name: count-{run}, key: count-{run}, plans: {{soccer: counting}}}}
  - {{name: rated-{run}, key: rated-{run}, plans: {{soccer: rated}}}}
  - {{name: bill-{run}, key: bill-{run}, plans: {{soccer: billing, weather: billing}}}}
  - {{name: local-{run}, key: local-{run}, plans: {{soccer: local}}}}
  - name: vip-{run}
    key: vip-{run}
    plans:
      soccer: {{plan: trial, rate: {{limit: 50, per: second}}, quota: {{limit: 3, per: day}}}}
"""


class Rig:
    def __init__(self, worker: Worker, upstream: Upstream, run: str, http: aiohttp.ClientSession):
        self.worker = worker
        self.upstream = upstream
        self.run = run
        self.http = http

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.worker.proxy_port}{path}"

    def admin(self, path: str) -> str:
        return f"http://127.0.0.1:{self.worker.admin_port}{path}"

    async def get(self, key: str, path: str) -> tuple[int, dict[str, str], Any]:
        async with self.http.get(self.url(path), headers={"X-API-Key": f"{key}-{self.run}"}) as r:
            body = await r.json(content_type=None)
            return r.status, dict(r.headers), body

    async def used(self, key: str, product: str = "soccer") -> int:
        async with self.http.get(self.admin(f"/admin/usage/{key}-{self.run}")) as response:
            assert response.status == 200
            return int((await response.json())["products"][product]["quota"]["used"])

    async def used_becomes(self, key: str, expected: int) -> None:
        """Refunds land just after the answer: wait (briefly) for them."""
        await eventually(lambda: self.used(key), expected)

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with self.http.get(self.admin("/metrics")) as response:
            text = await response.text()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


async def eventually(read: Callable[[], Awaitable[Any]], expected: Any) -> None:
    deadline = time.monotonic() + 5
    while (value := await read()) != expected:
        assert time.monotonic() < deadline, f"{value!r} never became {expected!r}"
        await asyncio.sleep(0.02)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    url = "memory://"
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    elif request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").url
    # A generous storage timeout: the first calls to a cluster open a connection each.
    async with _running_rig(tmp_path, storage_url=url, storage_timeout="2s") as rig:
        yield rig


@asynccontextmanager
async def _running_rig(tmp_path: Path, **server: str) -> AsyncIterator[Rig]:
    """An upstream and an in-process gateway serving API with `server` settings."""
    run = uuid.uuid4().hex[:8]
    async with running_upstream() as upstream:
        config = write_config(
            tmp_path / "c",
            API.format(upstream=upstream.url, run=run),
            server=worker_server_yaml(**server),
        )
        async with running_gateway(config) as worker, aiohttp.ClientSession() as http:
            yield Rig(worker, upstream, run, http)


async def test_slow_5xx_never_overrun_the_quota_and_are_all_given_back(rig: Rig) -> None:
    path = "/soccer/slow?for=0.2&status=500"
    for wave in (20, 8):
        rig.upstream.most_slow_in_flight = 0
        answers = await asyncio.gather(*(rig.get("refund", path) for _ in range(wave)))
        statuses = [status for status, _, _ in answers]
        # Five units, all taken at admission: never more than five requests in flight. (A
        # request that a busy machine sends after the first refunds landed may be admitted
        # too, never more than five at a time.)
        assert rig.upstream.most_slow_in_flight == 5
        # (500 from the upstream; 504 should a busy machine make it slower than its timeout)
        failed = statuses.count(500) + statuses.count(504)
        assert failed >= 5
        assert failed + statuses.count(429) == wave
        refused = {body["code"] for status, _, body in answers if status == 429}
        assert refused <= {"quota_exceeded"}
        # ...and every unit came back, so the next wave has five again.
        await rig.used_becomes("refund", 0)
    samples = await rig.metrics()
    labels = frozenset({("product", "soccer"), ("plan", "refunding"), ("result", "ok")})
    assert samples[("gateway_quota_refunds_total", labels)] >= 10


async def test_without_refund_on_failures_count(rig: Rig) -> None:
    for _ in range(2):
        status, _, _ = await rig.get("count", "/soccer/status/500")
        assert status == 500
    await asyncio.sleep(0.05)
    assert await rig.used("count") == 2


async def test_a_504_and_a_499_are_given_back(rig: Rig) -> None:
    status, headers, body = await rig.get("refund", "/soccer/slow?for=2")  # timeout: 300ms
    assert (status, body["code"]) == (504, "gateway_timeout")
    assert headers["X-Quota-Remaining"] == "4"
    await rig.used_becomes("refund", 0)

    # The client goes away while the upstream is still thinking. (The first slow request set
    # the event already: this one must be seen arriving on its own.)
    rig.upstream.started_slow.clear()
    _, writer = await asyncio.open_connection("127.0.0.1", rig.worker.proxy_port)
    try:
        key = f"refund-{rig.run}"
        writer.write(
            f"GET /soccer/slow?for=0.25 HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n\r\n".encode()
        )
        await writer.drain()
        await asyncio.wait_for(rig.upstream.started_slow.wait(), 5)
        assert await rig.used("refund") == 1
    finally:
        writer.transport.abort()
    await rig.used_becomes("refund", 0)
    # A 4xx of the upstream's is an answer: it counts. So does an upstream's own 499: the
    # client has it whole (only the gateway's record of a client that left is given back).
    assert (await rig.get("refund", "/soccer/status/404"))[0] == 404
    assert (await rig.get("refund", "/soccer/status/499"))[0] == 499
    await asyncio.sleep(0.05)
    assert await rig.used("refund") == 2


async def test_a_5xx_whose_client_left_during_its_body_is_given_back_under_5xx(rig: Rig) -> None:
    """An answer cut short after its head was sent counts by the status it began with: the
    upstream failed (503), and its client, told so by the head, left before the body was all
    there. Under refund_on: [5xx] the units stayed taken: the request was a 499 to the
    refund, and 499 is not listed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.worker.proxy_port)
    try:
        key = f"bill-{rig.run}"
        writer.write(
            f"GET /soccer/big?status=503&bytes=50000000 HTTP/1.1\r\nHost: t\r\n"
            f"X-API-Key: {key}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 503 ")
        await asyncio.wait_for(reader.readexactly(1000), 5)  # some of the body, not all
    finally:
        writer.transport.abort()
    await rig.used_becomes("bill", 0)
    # A 200 cut by its client is a 499 and no 5xx: it counts under refund_on: [5xx].
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.worker.proxy_port)
    try:
        writer.write(
            f"GET /soccer/big?bytes=50000000 HTTP/1.1\r\nHost: t\r\n"
            f"X-API-Key: {key}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.transport.abort()
    await asyncio.sleep(0.2)
    assert await rig.used("bill") == 1


async def test_the_rate_is_not_given_back(rig: Rig) -> None:
    assert [(await rig.get("rated", "/soccer/status/500"))[0] for _ in range(2)] == [500, 500]
    status, _, body = await rig.get("rated", "/soccer/status/200")
    assert (status, body["code"]) == (429, "throttled")
    await rig.used_becomes("rated", 0)


async def test_cost_history_and_csv(rig: Rig, request: pytest.FixtureRequest) -> None:
    key = f"bill-{rig.run}"
    before = await rig.metrics()
    assert (await rig.get("bill", "/soccer/heavy/a"))[0] == 200
    status, headers, _ = await rig.get("bill", "/soccer/heavy/b")
    assert (status, headers["X-Quota-Remaining"]) == (200, "80")
    assert (await rig.get("bill", "/soccer/heavy/status/503"))[0] == 503
    assert (await rig.get("bill", "/soccer/light"))[0] == 200
    assert (await rig.get("bill", "/weather/today"))[0] == 200
    await rig.used_becomes("bill", 21)

    today = datetime.now(UTC).date().isoformat()
    async with rig.http.get(rig.admin(f"/admin/usage/{key}/history?from={today}")) as response:
        assert response.status == 200
        history = await response.json()
    assert history["days"] == [
        {"date": today, "product": "soccer", "plan": "billing", "requests": 4, "units": 21},
        {"date": today, "product": "weather", "plan": "billing", "requests": 1, "units": 1},
    ]

    async with rig.http.get(rig.admin(f"/admin/usage.csv?from={today}&to={today}")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/csv")
        lines = (await response.text()).splitlines()
    assert lines[0] == "date,key,product,plan,requests,units"
    mine = [line for line in lines[1:] if f",{key}," in line]
    assert mine == [f"{today},{key},soccer,billing,4,21", f"{today},{key},weather,billing,1,1"]
    rows = [line.split(",") for line in lines[1:]]
    assert rows == sorted(rows, key=lambda row: (row[0], row[1], row[2], row[3]))

    # (The metrics are the process's, shared by the tests: compared as increases.)
    after = await rig.metrics()
    units = ("gateway_quota_units_total", frozenset({("product", "soccer"), ("plan", "billing")}))
    assert after[units] - before.get(units, 0) == 31
    refunded = (
        "gateway_quota_refunds_total",
        frozenset({("product", "soccer"), ("plan", "billing"), ("result", "ok")}),
    )
    assert after[refunded] - before.get(refunded, 0) == 10


async def test_a_credit_answered_503_and_retried_with_its_idempotency_key_counts_once(
    tmp_path: Path, fresh_redis_server: RedisServer
) -> None:
    """A frozen Redis gets the credit command and runs it when it thaws, after the gateway
    answered 503: the retry the 503 invites must not add the units a second time."""
    async with _running_rig(tmp_path, storage_url=fresh_redis_server.url) as rig:
        key = f"bill-{rig.run}"
        credit_url = rig.admin(f"/admin/usage/{key}/soccer/credit")
        once = {"Idempotency-Key": "invoice-2026-12-0001"}
        assert await rig.used("bill") == 0  # the storage's connections are open
        fresh_redis_server.pause()
        try:
            async with rig.http.post(credit_url, json={"amount": 7}, headers=once) as r:
                assert r.status == 503
        finally:
            fresh_redis_server.resume()
        # The thawed Redis runs the first command and the retries, in an order of its own:
        # one of them adds the units, the others are told they were added.
        answers = []
        for amount in (7, 7, 8):
            async with rig.http.post(credit_url, json={"amount": amount}, headers=once) as r:
                body = await r.json(content_type=None)
                answers.append((r.status, r.headers.get("Idempotent-Replayed")))
        assert answers[1:] == [(200, "true"), (409, None)]
        assert answers[0] in ((200, "true"), (200, None))
        assert body["detail"].startswith("Idempotency-Key 'invoice-2026-12-0001' was used")
        async with rig.http.get(rig.admin(f"/admin/usage/{key}")) as response:
            quota = (await response.json())["products"]["soccer"]["quota"]
        assert (quota["credit"], quota["limit"]) == (7, 107)
        async with rig.http.post(
            credit_url, json={"amount": 1}, headers={"Idempotency-Key": "two words"}
        ) as r:
            problem = await r.json(content_type=None)
            assert r.status == 400 and problem["detail"].startswith("Idempotency-Key:")
        # Two keys: which one names the credit would be a guess.
        two = CIMultiDict([("Idempotency-Key", "invoice-a"), ("Idempotency-Key", "invoice-b")])
        async with rig.http.post(credit_url, json={"amount": 1}, headers=two) as r:
            problem = await r.json(content_type=None)
            assert (r.status, problem["detail"]) == (400, "Idempotency-Key: given twice; send one.")
        async with rig.http.get(rig.admin(f"/admin/usage/{key}")) as response:
            assert (await response.json())["products"]["soccer"]["quota"]["credit"] == 7


async def test_a_subscription_whose_registering_hit_was_lost_is_registered_again(
    tmp_path: Path, fresh_redis_server: RedisServer
) -> None:
    """Redis lost its data, and the day's first hit then ran in a stalled Redis after the
    gateway gave up on it: its reply, the one that says to register the subscription for the
    export, never came. The next admission must register it, or the day is never billed."""
    async with _running_rig(tmp_path, storage_url=fresh_redis_server.url) as rig:
        assert (await rig.get("bill", "/soccer/x"))[0] == 200
        fresh_redis_server.client().flushall()
        fresh_redis_server.pause()
        try:
            assert (await rig.get("bill", "/soccer/x"))[0] == 503
        finally:
            fresh_redis_server.resume()
        assert (await rig.get("bill", "/soccer/x"))[0] == 200
        today = datetime.now(UTC).date().isoformat()
        async with rig.http.get(rig.admin(f"/admin/usage.csv?from={today}")) as response:
            lines = (await response.text()).splitlines()
    # The day is there, with the one admission answered 200: the hit answered 503 ran in the
    # thawed Redis after its deadline and took nothing (had it run in time: 2 and 2).
    assert lines[1:] in (
        [f"{today},bill-{rig.run},soccer,billing,2,2"],
        [f"{today},bill-{rig.run},soccer,billing,1,1"],
    )


async def test_overrides_and_credit(rig: Rig) -> None:
    key = f"vip-{rig.run}"
    decided = [await rig.get("vip", "/soccer/x") for _ in range(4)]
    assert [status for status, _, _ in decided] == [200, 200, 200, 429]
    # The key's own quota (3 a day) and rate (50/s), under the plan's name.
    assert decided[0][1]["X-Quota-Limit"] == "3"
    assert decided[0][1]["X-RateLimit-Limit"] == "50"
    async with rig.http.get(rig.admin(f"/admin/usage/{key}")) as response:
        soccer = (await response.json())["products"]["soccer"]
    assert soccer["plan"] == "trial"
    assert (soccer["quota"]["limit"], soccer["quota"]["per"]) == (3, "day")
    assert soccer["rate"]["limit"] == 50

    credit_url = rig.admin(f"/admin/usage/{key}/soccer/credit")
    async with rig.http.post(credit_url, json={"amount": 2}) as response:
        assert response.status == 200
        quota = (await response.json())["products"]["soccer"]["quota"]
    assert (quota["limit"], quota["used"], quota["remaining"], quota["credit"]) == (5, 3, 2, 2)
    decided = [await rig.get("vip", "/soccer/x") for _ in range(3)]
    assert [status for status, _, _ in decided] == [200, 200, 429]
    assert decided[0][1]["X-Quota-Limit"] == "5"
    assert decided[0][1]["X-Quota-Remaining"] == "1"

    for body, field in (
        ({"amount": 0}, "amount"),
        ({"amount": "5"}, "amount"),
        ({"amount": True}, "amount"),
        ({}, "amount"),
        ([1], "body"),
        ({"amount": 5, "units": 5}, "units"),
    ):
        async with rig.http.post(credit_url, json=body) as response:
            problem = await response.json(content_type=None)
            assert (response.status, problem["code"]) == (400, "bad_request")
            assert problem["detail"].startswith(f"{field}:")
    async with rig.http.post(credit_url, data=b"{not json") as response:
        problem = await response.json(content_type=None)
        assert response.status == 400 and problem["detail"].startswith("body: not valid JSON")
    async with rig.http.post(
        rig.admin("/admin/usage/nobody/soccer/credit"), json={"amount": 1}
    ) as r:
        assert r.status == 404
    async with rig.http.post(
        rig.admin(f"/admin/usage/{key}/weather/credit"), json={"amount": 1}
    ) as r:
        assert r.status == 404


async def test_history_and_csv_refuse_bad_dates(rig: Rig) -> None:
    for query, field in (
        ("from=2026-13-01", "from"),
        ("to=yesterday", "to"),
        ("from=2026-12-02&to=2026-12-01", "from"),
        ("from=2099-01-01", "from"),  # after today, where `to` is by default
        ("from=2000-01-01&to=2000-01-31", "to"),  # before the days kept
        # A misspelt parameter left out silently answered the default range (a billing
        # export of the wrong month), and of a parameter given twice the first counted.
        ("form=2026-11-01&to=2026-11-30", "form"),
        ("from=2026-11-01&from=2026-10-01", "from"),
        ("to=2026-11-30&to=2026-10-31", "to"),
    ):
        for path in (f"/admin/usage/refund-{rig.run}/history", "/admin/usage.csv"):
            async with rig.http.get(rig.admin(f"{path}?{query}")) as response:
                problem = await response.json(content_type=None)
                assert (response.status, problem["code"]) == (400, "bad_request"), path
                assert problem["detail"].startswith(f"{field}:")
    async with rig.http.get(rig.admin("/admin/usage/nobody-at-all/history")) as response:
        assert response.status == 404
    # `to` after today stands for today: a `from` after it is after today, not after `to`.
    query = "from=2099-01-02&to=2099-01-03"
    async with rig.http.get(rig.admin(f"/admin/usage.csv?{query}")) as response:
        problem = await response.json(content_type=None)
    today = datetime.now(UTC).date().isoformat()
    assert (response.status, problem["detail"]) == (
        400,
        f"from: must not be after today ({today}), the last day with history.",
    )


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
        # A plan with a quota is not checked against it meanwhile.
        assert (await rig.get("count", "/soccer/a"))[0] == 200

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
            tmp_path / "c", API.format(upstream=upstream.url, run=run), server=server
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


async def test_an_api_key_has_its_own_limits_too(rig: Rig) -> None:
    name = f"api-vip-{rig.run}"
    # The plan's refund_on (5xx) stays: the override's quota does not list its own.
    own = {"plan": "billing", "quota": {"limit": 2, "per": "day"}}
    body = {"name": name, "plans": {"soccer": own, "weather": "billing"}}
    async with rig.http.post(rig.admin("/admin/keys"), json=body) as response:
        assert response.status == 201, await response.text()
        secret = (await response.json())["key"]
    headers = {"X-API-Key": secret}

    async def get(path: str) -> tuple[int, dict[str, str]]:
        async with rig.http.get(rig.url(path), headers=headers) as response:
            await response.read()
            return response.status, dict(response.headers)

    status, first = await get("/soccer/status/500")  # refunded, as the plan says
    assert (status, first["X-Quota-Limit"]) == (500, "2")
    await rig.used_becomes(name.removesuffix(f"-{rig.run}"), 0)
    assert [(await get("/soccer/x"))[0] for _ in range(3)] == [200, 200, 429]
    async with rig.http.get(rig.admin(f"/admin/usage/{name}")) as response:
        soccer = (await response.json())["products"]["soccer"]
    assert (soccer["plan"], soccer["quota"]["limit"], soccer["quota"]["used"]) == ("billing", 2, 2)

    # The keys API refuses what the file refuses, naming the field.
    bad = {
        "name": f"api-bad-{rig.run}",
        "plans": {"soccer": {"plan": "trial", "quota": {"limit": 0, "per": "day"}}},
    }
    async with rig.http.post(rig.admin("/admin/keys"), json=bad) as response:
        problem = await response.json(content_type=None)
        assert response.status == 400
        assert "plans.soccer.quota.limit: must be at least 1" in problem["detail"]


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


async def test_a_route_costing_more_than_the_whole_quota_says_so(rig: Rig) -> None:
    """Retrying after the period cannot help: the detail says why rather than "used up"."""
    status, headers, body = await rig.get("count", "/soccer/heavy/x")
    assert (status, body["code"]) == (429, "quota_exceeded")
    assert body["detail"] == (
        "This route costs 10 units, more than the whole quota of the counting plan for "
        "'soccer' (5): no period admits it without more credit."
    )
    assert headers["X-Quota-Remaining"] == "5"
    assert await rig.used("count") == 0
    status, _, body = await rig.get("count", "/soccer/light")
    assert status == 200
    for _ in range(4):
        await rig.get("count", "/soccer/light")
    status, _, body = await rig.get("count", "/soccer/light")
    assert (status, body["code"]) == (429, "quota_exceeded")
    assert "is used up until the period ends" in body["detail"]


# Keeps a Redis busy for ARGV[1] microseconds of its own clock: what a slow command does to
# the calls queued behind it.
_SPIN = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat
    t = redis.call('TIME')
until t[1] * 1000000 + t[2] - start > tonumber(ARGV[1])
"""


async def test_a_client_gone_while_its_check_waits_on_redis_is_settled(
    rig: Rig, request: pytest.FixtureRequest
) -> None:
    """Redis is busy; a client sends a request and leaves while its check waits in Redis's
    queue, well within the storage timeout. Redis then runs the check and takes the units: it
    was charged and never given back, and no metric counted the admission."""
    url = rig.worker.config.storage.url
    if url.startswith("memory://"):
        pytest.skip("the memory storage decides at once: no check is ever on its way")
    if url.startswith("redis+cluster://"):
        nodes = request.getfixturevalue("redis_cluster").nodes
    else:
        nodes = [request.getfixturevalue("redis_server")]
    await rig.get("refund", "/soccer/warm-up")  # the connections and the script are ready
    await rig.used_becomes("refund", 1)
    before = await rig.metrics()
    clients = [node.client() for node in nodes]
    try:
        busy = [asyncio.to_thread(client.eval, _SPIN, 0, 400_000) for client in clients]
        spinning = asyncio.gather(*busy)
        await asyncio.sleep(0.1)  # the scripts have begun
        _, writer = await asyncio.open_connection("127.0.0.1", rig.worker.proxy_port)
        key = f"refund-{rig.run}"
        writer.write(f"GET /soccer/gone HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.1)  # the check is in Redis's queue
        writer.transport.abort()
        await spinning
    finally:
        for client in clients:
            client.close()
    await rig.used_becomes("refund", 1)  # taken when Redis ran the check, then given back
    labels = frozenset({("product", "soccer"), ("plan", "refunding")})

    def grew(name: str, extra: tuple[str, str]) -> float:
        sample = (name, labels | {extra})
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    after = await rig.metrics()
    deadline = time.monotonic() + 5
    while grew("gateway_quota_refunds_total", ("result", "ok")) < 1:
        assert time.monotonic() < deadline, "the refund was never counted"
        await asyncio.sleep(0.02)
        after = await rig.metrics()
    assert grew("gateway_limit_decisions_total", ("decision", "allowed")) == 1
    assert grew("gateway_quota_refunds_total", ("result", "ok")) == 1
    assert (
        after[("gateway_quota_units_total", labels)] - before[("gateway_quota_units_total", labels)]
        == 1
    )
