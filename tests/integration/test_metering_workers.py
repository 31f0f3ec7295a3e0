"""What a billing team reads off a gateway of two workers sharing a real Redis: the usage API,
the history and the metrics agree on the units a key keeps, whichever worker admitted,
refunded or answered, and a concurrent burst at the edge of the quota never overruns it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.config import server_yaml, write_config
from tests.support.operations import Scrape, requests_counted_by_worker, serving_workers
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.sockets import free_ports
from tests.support.upstream import running_upstream

API = """
products:
  soccer:
    upstream: {{url: "{upstream}/base", timeout: 10s}}
    routes:
      - path: /soccer/heavy/{{rest:path}}
        cost: 3
      - path: /soccer/metered/{{rest:path}}
        cost: 2
        cost_header: X-Units-Used
      - path: /soccer/{{rest:path}}
plans:
  billed:
    quota: {{limit: {limit}, per: month, refund_on: [5xx, 499]}}
keys:
  - {{name: {key}, key: {key}, plans: {{soccer: billed}}}}
"""
LIMIT = 20
CREDIT = 4
# (path, cost, its answer unless the quota refuses it): kept; refunded as the upstream's 5xx;
# kept although the upstream said 404; refunded as a 499 (the client leaves); two of 2 units
# held, settled at the 1 and the 3 their upstream reports.
MIX = (
    ("/soccer/heavy/a", 3, 200),
    ("/soccer/heavy/status/503", 3, 503),
    ("/soccer/a", 1, 200),
    ("/soccer/status/500", 1, 500),
    ("/soccer/status/404", 1, 404),
    ("/soccer/heavy/slow?for=10", 3, 499),
    ("/soccer/metered/reports?cost=1", 1, 200),
    ("/soccer/metered/reports?cost=3", 3, 200),
)
OVERRUN = 1  # what a request of the last kind takes beyond what it held at admission
BURST = 36
PLAN = ("soccer", "billed")


class Billing:
    """The proxy port and the admin port of the gateway, as one key's client sees them."""

    def __init__(self, http: aiohttp.ClientSession, key: str, proxy: int, admin: int) -> None:
        self.http, self.key = http, key
        self.proxy, self.admin = f"http://127.0.0.1:{proxy}", f"http://127.0.0.1:{admin}"

    async def send(self, path: str, leaves: bool) -> int:
        """The status of one request; 499 for one whose client left before the answer."""
        timeout = aiohttp.ClientTimeout(total=0.3 if leaves else 10)
        headers = {"X-API-Key": self.key}
        try:
            async with self.http.get(self.proxy + path, headers=headers, timeout=timeout) as r:
                await r.read()
                return r.status
        except TimeoutError:
            assert leaves, path
            return 499

    async def scrape(self) -> Scrape:
        async with self.http.get(f"{self.admin}/metrics") as response:
            return Scrape(await response.text())

    async def quota(self) -> tuple[int, int, int]:
        """limit, credit, used, from the usage API."""
        async with self.http.get(f"{self.admin}/admin/usage/{self.key}") as response:
            assert response.status == 200
            quota = (await response.json())["products"]["soccer"]["quota"]
        return quota["limit"], quota["credit"], quota["used"]

    async def history(self) -> tuple[int, int]:
        """requests, units of the key's one line of history (today's)."""
        async with self.http.get(f"{self.admin}/admin/usage/{self.key}/history") as response:
            (day,) = (await response.json())["days"]
        return day["requests"], day["units"]


def grew(before: Scrape, after: Scrape, name: str, *labels: str) -> float:
    """How much the plan's series of `name` (and `labels`, the rest of its labels) grew."""
    names = ("product", "plan", "decision" if "decisions" in name else "result")[: 2 + len(labels)]
    then, now = before.series(name, *names), after.series(name, *names)
    return now.get((*PLAN, *labels), 0.0) - then.get((*PLAN, *labels), 0.0)


async def test_two_workers_bill_what_the_usage_api_history_and_metrics_all_say(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key = f"bill-{uuid.uuid4().hex[:8]}"
    proxy_port, admin_port = free_ports(2)
    async with running_upstream() as upstream:
        server = server_yaml(proxy_port, admin_port, redis_server.url, workers=2)
        # A generous storage timeout: on a busy machine a check answered after 250 ms is a 503
        # whose units Redis may still have taken, which no client-side count could tell apart.
        server = server.replace("timeout: 250ms", "timeout: 2s")
        config = write_config(
            tmp_path / "c", API.format(upstream=upstream.url, key=key, limit=LIMIT), server=server
        )
        gateway = GatewayProcess(config)
        # A new connection per request, so that the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        try:
            await asyncio.to_thread(gateway.start, proxy_port, admin_port)
            workers = await asyncio.to_thread(serving_workers, gateway, 2)
            async with aiohttp.ClientSession(connector=connector) as http:
                billing = Billing(http, key, proxy_port, admin_port)
                credit = f"{billing.admin}/admin/usage/{key}/soccer/credit"
                async with http.post(credit, json={"amount": CREDIT}) as response:
                    assert response.status == 200
                before = await billing.scrape()

                sent = [MIX[i % len(MIX)] for i in range(BURST)]
                statuses = await asyncio.gather(
                    *(billing.send(path, answer == 499) for path, _, answer in sent)
                )

                for (path, _, answer), status in zip(sent, statuses, strict=True):
                    assert status in (answer, 429), (path, status)
                # The units kept: those of admitted answers that refund_on does not list. A
                # client that left keeps none, whether its request was admitted (and its units
                # given back) or not.
                kept = sum(
                    cost
                    for (_, cost, _), status in zip(sent, statuses, strict=True)
                    if status in (200, 404)
                )
                # A report above the hold is taken whatever is left (README "Metering").
                overruns = sum(
                    1
                    for (path, _, _), status in zip(sent, statuses, strict=True)
                    if status == 200 and path == MIX[-1][0]
                )
                assert 0 < kept <= LIMIT + CREDIT + OVERRUN * overruns
                assert 429 in statuses  # the burst wanted more than the quota holds

                # Refunds land just after their answers, a 499's once the gateway notices the
                # client left: until then the numbers may lag, never disagree for good.
                deadline = time.monotonic() + 10
                while True:
                    after = await billing.scrape()
                    admitted, units = await billing.history()
                    billed = (
                        grew(before, after, "gateway_quota_units_total")
                        + grew(before, after, "gateway_quota_charges_total", "ok")
                        - grew(before, after, "gateway_quota_refunds_total", "ok"),
                        units,
                        (await billing.quota())[2],
                        after.total("gateway_requests_total")
                        - before.total("gateway_requests_total"),
                    )
                    if billed == (kept, kept, kept, BURST):
                        break
                    assert time.monotonic() < deadline, (billed, (kept, kept, kept, BURST))
                    await asyncio.sleep(0.05)
                assert grew(before, after, "gateway_quota_refunds_total", "error") == 0
                assert grew(before, after, "gateway_quota_charges_total", "error") == 0
                assert admitted == grew(before, after, "gateway_limit_decisions_total", "allowed")
                # Every answer but a 429 was admitted; a client that left may have been or not.
                answered = BURST - statuses.count(429) - statuses.count(499)
                assert answered <= admitted <= answered + statuses.count(499)
                assert await billing.quota() == (LIMIT + CREDIT, CREDIT, kept)

                # Both workers answered part of the burst.
                shares: list[Any] = [
                    await asyncio.to_thread(requests_counted_by_worker, pid, tmp_path)
                    for pid in workers
                ]
                assert all(share > 0 for share in shares), shares

                # A reset starts the quota afresh and keeps the credit; the bill stays.
                reset = f"{billing.admin}/admin/usage/{key}/soccer"
                async with http.delete(reset) as response:
                    assert response.status == 204
                assert await billing.quota() == (LIMIT + CREDIT, CREDIT, 0)
                assert await billing.history() == (admitted, kept)
        finally:
            assert await asyncio.to_thread(gateway.stop) == 0, gateway.stderr()
            gateway.close()
