"""The usage requests make and the admin API that reads and changes it, end to end: real
requests through a gateway to a real upstream, the usage API on its admin port, for memory, a
real redis-server and a real Redis Cluster (the rig fixture). Costs, history and CSV, credits
(one retried with its idempotency key), a key's overrides, an API key's own limits, bad dates,
and a route costing more than the whole quota.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from multidict import CIMultiDict

from tests.support.metering_rig import Rig, _running_rig
from tests.support.redis_servers import RedisServer


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
