"""A cost the upstream reports (a route's cost_header), end to end: real requests through a
gateway to a real upstream that answers with X-Units-Used, the usage API and the history on its
admin port, for memory, a real redis-server and a real Redis Cluster (the rig fixture).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway import accesslog
from tests.support.metering_rig import Rig, eventually

METERED = "/soccer/metered/reports"  # cost: 10 held at admission
REPORTED = "/soccer/reported/reports"  # cost: 1 held at admission


def reporting(path: str, *costs: str, status: int = 200) -> str:
    query = "&".join(f"cost={cost}" for cost in costs)
    return f"{path}?status={status}" + (f"&{query}" if query else "")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def labels(**pairs: str) -> frozenset[tuple[str, str]]:
    return frozenset(pairs.items())


async def counted_since(rig: Rig, before: Samples) -> Samples:
    """What each series added since `before`: the rigs of one test run share the process's
    metrics."""
    return {name: value - before.get(name, 0.0) for name, value in (await rig.metrics()).items()}


async def history(rig: Rig, key: str) -> list[dict[str, Any]]:
    today = datetime.now(UTC).date().isoformat()
    url = rig.admin(f"/admin/usage/{key}-{rig.run}/history?from={today}&to={today}")
    async with rig.http.get(url) as response:
        assert response.status == 200
        days: list[dict[str, Any]] = (await response.json())["days"]
        return days


async def units_of(rig: Rig, key: str, product: str = "soccer") -> int:
    return sum(day["units"] for day in await history(rig, key) if day["product"] == product)


async def test_a_reported_cost_settles_the_request_both_ways(rig: Rig) -> None:
    before = await rig.metrics()
    # 3 of the 10 held: 7 come back; the client sees the upstream's line as it was.
    status, headers, _ = await rig.get("bill", reporting(METERED, "3"))
    assert status == 200
    assert headers["X-Units-Used"] == "3"
    # The quota headers say what is left once the answer is settled, not the hold's 90.
    assert headers["X-Quota-Remaining"] == "97"
    assert '"quota";r=97;' in headers["RateLimit"]
    await rig.used_becomes("bill", 3)
    # 25: 15 more than the hold are taken after the answer.
    status, headers, _ = await rig.get("bill", reporting(METERED, "25"))
    assert (status, headers["X-Quota-Remaining"]) == (200, "72")  # 100 - 3 - 25
    await rig.used_becomes("bill", 28)
    # 0: a call that used nothing gives the whole hold back.
    status, headers, _ = await rig.get("bill", reporting(METERED, "0"))
    assert (status, headers["X-Quota-Remaining"]) == (200, "72")
    await rig.used_becomes("bill", 28)
    await eventually(lambda: units_of(rig, "bill"), 28)
    (day,) = await history(rig, "bill")
    assert (day["requests"], day["units"], day["plan"]) == (3, 28, "billing")

    added = await counted_since(rig, before)
    plan = {"product": "soccer", "plan": "billing"}
    assert added[("gateway_quota_units_total", labels(**plan))] == 30  # held at admission
    assert added[("gateway_quota_refunds_total", labels(**plan, result="ok"))] == 7 + 10
    assert added[("gateway_quota_charges_total", labels(**plan, result="ok"))] == 15
    route = {"product": "soccer", "route": "/soccer/metered/{rest:path}"}
    assert added[("gateway_cost_reports_total", labels(**route, result="ok"))] == 3


async def test_a_report_above_what_is_left_is_taken_and_the_quota_refuses_after(
    rig: Rig,
) -> None:
    """The counting plan's quota is 5: one unit held, nine used, reported after the answer."""
    status, headers, _ = await rig.get("count", reporting(REPORTED, "9"))
    assert (status, headers["X-Quota-Remaining"]) == (200, "0")
    await rig.used_becomes("count", 9)
    async with rig.http.get(rig.admin(f"/admin/usage/count-{rig.run}")) as response:
        quota = (await response.json())["products"]["soccer"]["quota"]
    assert (quota["limit"], quota["used"], quota["remaining"]) == (5, 9, 0)
    status, headers, body = await rig.get("count", reporting(REPORTED, "1"))
    assert (status, body["code"], headers["X-Quota-Remaining"]) == (429, "quota_exceeded", "0")
    # Credit covers the overrun and one more request's hold: 5 + 5 - 9 = 1 left.
    credit = rig.admin(f"/admin/usage/count-{rig.run}/soccer/credit")
    async with rig.http.post(credit, json={"amount": 5}) as response:
        assert response.status == 200
    assert (await rig.get("count", reporting(REPORTED, "1")))[0] == 200
    await rig.used_becomes("count", 10)


async def test_a_missing_or_unreadable_report_leaves_the_hold(rig: Rig) -> None:
    before = await rig.metrics()
    for number, costs in enumerate(
        ((), ("12.5",), ("-3",), ("1e3",), ("4", "5"), (str(10**12 + 1),))
    ):
        status, headers, _ = await rig.get("bill", reporting(METERED, *costs))
        assert (status, headers["X-Quota-Remaining"]) == (200, str(90 - 10 * number))
    # Lines that agree are one report.
    assert (await rig.get("bill", reporting(METERED, "4", "4")))[0] == 200
    await rig.used_becomes("bill", 6 * 10 + 4)
    added = await counted_since(rig, before)
    route = {"product": "soccer", "route": "/soccer/metered/{rest:path}"}
    assert added[("gateway_cost_reports_total", labels(**route, result="missing"))] == 1
    assert added[("gateway_cost_reports_total", labels(**route, result="invalid"))] == 5
    assert added[("gateway_cost_reports_total", labels(**route, result="ok"))] == 1


async def test_leading_zeros_say_the_same_cost(rig: Rig) -> None:
    """`0007` is 7, however many zeros lead (more digits than the largest cost has)."""
    status, headers, _ = await rig.get("bill", reporting(METERED, "0" * 20 + "7"))
    assert (status, headers["X-Quota-Remaining"]) == (200, "93")
    # The next admission's headers count this settlement only once it has landed.
    await rig.used_becomes("bill", 7)
    status, headers, _ = await rig.get("bill", reporting(METERED, "0" * 20))
    assert (status, headers["X-Quota-Remaining"]) == (200, "93")
    await rig.used_becomes("bill", 7)


async def test_an_unreadable_report_is_logged_with_the_request_id(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """The log's lines are its text: the id is in it, for the disputed call's look-up."""
    caplog.clear()
    status, headers, _ = await rig.get("bill", reporting(METERED, "12.5"))
    assert status == 200
    (warning,) = [r for r in caplog.records if "reported a cost of '12.5'" in r.getMessage()]
    assert warning.levelname == "WARNING"
    assert headers["X-Request-ID"] in warning.getMessage()
    # Lines that disagree: the warning shows them all, not an empty value.
    caplog.clear()
    assert (await rig.get("bill", reporting(METERED, "4", "5")))[0] == 200
    assert any("reported a cost of '4, 5'" in r.getMessage() for r in caplog.records)


async def test_values_that_say_the_same_number_are_one_report(rig: Rig) -> None:
    """An intermediary may merge lines into one (`3, 3`); `3` and `03` are one number."""
    for number, costs in enumerate((("3, 3",), ("3", "03"), ("3,03", "3")), start=1):
        status, headers, _ = await rig.get("bill", reporting(METERED, *costs))
        assert (status, headers["X-Quota-Remaining"]) == (200, str(100 - 3 * number))
        await rig.used_becomes("bill", 3 * number)  # landed before the next admission
    for costs in (("3, 4",), ("3,",), ("3", "3, 5")):
        assert (await rig.get("bill", reporting(METERED, *costs)))[0] == 200
    await rig.used_becomes("bill", 9 + 30)


async def test_a_refunded_outcome_gives_back_the_hold_whatever_was_reported(rig: Rig) -> None:
    """The billing plan refunds 5xx: a 503 that reported a cost costs nothing; without
    refund_on (the counting plan) a 503's report is its cost, as any answer's."""
    status, headers, _ = await rig.get("bill", reporting(METERED, "25", status=503))
    # Its quota headers say what admission left, as any refunded answer's, not 100 - 25.
    assert (status, headers["X-Quota-Remaining"]) == (503, "90")
    await rig.used_becomes("bill", 0)
    status, headers, _ = await rig.get("count", reporting(REPORTED, "3", status=503))
    assert (status, headers["X-Quota-Remaining"]) == (503, "2")  # 5 - 3: not refunded
    await rig.used_becomes("count", 3)


async def test_a_plan_without_a_quota_is_billed_the_reported_cost(rig: Rig) -> None:
    """Pay as you go: the local plan has a rate and no quota; the day's units (the bill, in
    the history and the export) are what the upstream reported."""
    for cost in ("40", "2"):
        assert (await rig.get("local", reporting(METERED, cost)))[0] == 200
    await eventually(lambda: units_of(rig, "local"), 42)
    today = datetime.now(UTC).date().isoformat()
    async with rig.http.get(rig.admin(f"/admin/usage.csv?from={today}&to={today}")) as response:
        lines = (await response.text()).splitlines()
    assert f"{today},local-{rig.run},soccer,local,2,42" in lines


async def test_a_plan_without_a_quota_refunds_its_days_units_under_its_refund_on(
    rig: Rig,
) -> None:
    """Pay as you go with `refund_on: [5xx]` of the plan's own: a 5xx bills nothing, however
    it was held or reported; the history still counts the request."""
    for path, status in (
        (reporting(METERED, "7"), 200),
        (reporting(METERED, "25", status=503), 503),
        ("/soccer/status/500", 500),
        ("/soccer/heavy/x", 200),
    ):
        assert (await rig.get("payg", path))[0] == status
    await eventually(lambda: units_of(rig, "payg"), 17)
    (day,) = await history(rig, "payg")
    assert (day["requests"], day["units"], day["plan"]) == (4, 17, "payg")
    await asyncio.sleep(0.1)  # nothing more lands later
    assert await units_of(rig, "payg") == 17


async def test_a_client_gone_during_a_reported_answer_pays_the_report_but_under_499(
    rig: Rig,
) -> None:
    """The head said what the call cost; the client left during the body. A 499 is no
    outcome the billing plan refunds: the report stands. The refunding plan lists 499: all of
    the hold comes back."""
    for key, path, used in (
        ("bill", "/soccer/metered/big?bytes=50000000&cost=4", 4),
        ("refund", "/soccer/reported/big?bytes=50000000&cost=3", 0),
    ):
        head = await rig.leave_during_the_body(key, path)
        assert head.startswith(b"HTTP/1.1 200 ")
        await rig.used_becomes(key, used)
        await asyncio.sleep(0.1)  # nothing more lands later
        assert await rig.used(key) == used


async def test_only_a_route_with_a_cost_header_reads_one(rig: Rig) -> None:
    """The same upstream line on a route without cost_header is an answer header like any."""
    status, headers, _ = await rig.get("bill", "/soccer/plain/reports?cost=50")
    assert (status, headers["X-Units-Used"]) == (200, "50")
    await asyncio.sleep(0.1)  # anything settled would land by now
    assert await rig.used("bill") == 1


async def test_the_access_log_says_what_each_request_was_settled_at(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    """`units` on the lines of a route with a cost_header: the report, the hold when there
    was none, 0 when refund_on gave it all back; no `units` elsewhere."""
    capsys.readouterr()
    for path in (
        reporting(METERED, "3"),
        reporting(METERED),
        reporting(METERED, "25", status=503),
        "/soccer/plain/reports?cost=50",
    ):
        await rig.get("bill", path)
    accesslog.flush_access_log()  # the serving worker batches its lines
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    mine = [line for line in lines if line["key"] == f"bill-{rig.run}"]
    assert [(line["status"], line.get("units")) for line in mine] == [
        (200, 3),
        (200, 10),
        (503, 0),
        (200, None),
    ]


STREAM = "/stream/generate"  # cost: 10 held; the upstream reports in a chunked body's trailer
USAGE = "/stream/usage/chat"  # cost: 10 held; cost_field: usage.total_tokens


@pytest.mark.parametrize(
    ("small", "remaining", "large", "route"),
    [
        (f"{STREAM}?trailer=3", "90", f"{STREAM}?trailer=25&bytes=3000000", "/stream/{rest:path}"),
        (f"{USAGE}?usage=3", "97", f"{USAGE}?usage=25&bytes=500000", "/stream/usage/{rest:path}"),
    ],
    ids=["trailer", "json_body"],
)
async def test_a_report_after_the_head_settles_the_request(
    rig: Rig, small: str, remaining: str, large: str, route: str
) -> None:
    """A chunked answer's trailer (its head saying nothing), or the field of its JSON body,
    says the cost after the head: the head's quota headers say what admission left, except
    for a JSON body of at most 64 KiB framed by its length, read before its head leaves (97:
    it counts the report). A body long enough to be relayed as it comes is read the same."""
    before = await rig.metrics()
    status, headers, _ = await rig.get("bill", small)
    assert (status, headers["X-Quota-Remaining"]) == (200, remaining)
    assert "X-Units-Used" not in headers  # trailer fields are not passed on
    await rig.used_becomes("bill", 3, "stream")
    status, headers, body = await rig.get("bill", large)
    assert (status, len(body["pad"]) >= 500_000) == (200, True)
    assert headers["X-Quota-Remaining"] == "87"  # 3 used and 10 held: what admission left
    await rig.used_becomes("bill", 28, "stream")
    await eventually(lambda: units_of(rig, "bill", "stream"), 28)
    added = await counted_since(rig, before)
    labelled = labels(product="stream", route=route, result="ok")
    assert added[("gateway_cost_reports_total", labelled)] == 2


async def test_a_report_in_the_head_wins_over_the_trailer(rig: Rig) -> None:
    status, headers, _ = await rig.get("bill", f"{STREAM}?head=4&trailer=9")
    assert (status, headers["X-Units-Used"], headers["X-Quota-Remaining"]) == (200, "4", "96")
    await rig.used_becomes("bill", 4, "stream")
    await asyncio.sleep(0.1)  # the trailer's 9 would have landed by now
    assert await rig.used("bill", "stream") == 4


async def test_a_chunked_answer_without_a_readable_trailer_report_leaves_the_hold(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    before = await rig.metrics()
    caplog.clear()
    for query in ("", "trailer=2.5", "trailer=4&trailer=5", "bytes=300000"):
        assert (await rig.get("bill", f"{STREAM}?{query}"))[0] == 200
    await rig.used_becomes("bill", 40, "stream")
    assert any("reported a cost of '2.5'" in r.getMessage() for r in caplog.records)
    assert any("reported a cost of '4, 5'" in r.getMessage() for r in caplog.records)
    added = await counted_since(rig, before)
    route = {"product": "stream", "route": "/stream/{rest:path}"}
    assert added[("gateway_cost_reports_total", labels(**route, result="missing"))] == 2
    assert added[("gateway_cost_reports_total", labels(**route, result="invalid"))] == 2


@pytest.mark.parametrize(
    ("path", "route"),
    [
        (f"{STREAM}?trailer=1&hang&bytes=100000", "/stream/{rest:path}"),
        (f"{USAGE}?events=2000&usage=1&hang", "/stream/usage/{rest:path}"),
    ],
    ids=["trailer", "events"],
)
async def test_a_client_gone_before_the_report_pays_the_hold(
    rig: Rig, path: str, route: str
) -> None:
    """The upstream stops after its first chunk (before its trailer, before its usage event);
    the client leaves: the hold stands (the billing plan does not refund 499), and the report
    counts as cut, apart from an upstream that said nothing."""
    before = await rig.metrics()
    head = await rig.leave_during_the_body("bill", path)
    assert head.startswith(b"HTTP/1.1 200 ")
    await rig.used_becomes("bill", 10, "stream")

    async def cut() -> float:
        added = await counted_since(rig, before)
        cut = labels(product="stream", route=route, result="cut")
        return added.get(("gateway_cost_reports_total", cut), 0)

    await eventually(cut, 1)
    await asyncio.sleep(0.1)  # nothing more lands later
    assert await rig.used("bill", "stream") == 10


async def test_the_upstream_is_asked_for_a_body_it_does_not_compress(rig: Rig) -> None:
    """The client accepts gzip; the upstream would compress for it, and the gateway could not
    read the field: on this route the gateway asks it for the body as it is."""
    url = rig.url(f"{USAGE}?usage=4")
    headers = {"X-API-Key": f"bill-{rig.run}", "Accept-Encoding": "gzip"}
    async with rig.http.get(url, headers=headers) as response:
        assert response.status == 200
        assert "Content-Encoding" not in response.headers
        assert (await response.json())["usage"] == {"total_tokens": 4}
    await rig.used_becomes("bill", 4, "stream")


async def test_a_body_without_a_readable_field_leaves_the_hold(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    before = await rig.metrics()
    caplog.clear()
    for query in ("usage=12.5", 'usage="12"', "usage=-1", "usage=true", "usage=", "usage=<"):
        url = rig.url(f"{USAGE}?{query}")
        async with rig.http.get(url, headers={"X-API-Key": f"bill-{rig.run}"}) as response:
            assert response.status == 200  # the last one's body is not JSON
    await rig.used_becomes("bill", 60, "stream")
    assert any("reported a cost of '12.5'" in r.getMessage() for r in caplog.records)
    assert any("""reported a cost of '"12"'""" in r.getMessage() for r in caplog.records)
    added = await counted_since(rig, before)
    route = {"product": "stream", "route": "/stream/usage/{rest:path}"}
    assert added[("gateway_cost_reports_total", labels(**route, result="invalid"))] == 4
    assert added[("gateway_cost_reports_total", labels(**route, result="missing"))] == 2


async def test_the_last_event_of_a_stream_reports_the_cost(rig: Rig) -> None:
    """Server-sent events, as LLM APIs stream: token events, then one with the usage (its
    data over two lines), then [DONE]; in pieces of 7 bytes, so that lines and events are
    split across reads."""
    before = await rig.metrics()
    url = rig.url(f"{USAGE}?events=40&usage=25&split=7")
    async with rig.http.get(url, headers={"X-API-Key": f"bill-{rig.run}"}) as response:
        assert response.status == 200
        text = await response.text()
    assert text.count("data: ") == 40 + 2 + 1  # every event reached the client
    await rig.used_becomes("bill", 25, "stream")
    # Without the usage event: the hold stands.
    async with rig.http.get(
        rig.url(f"{USAGE}?events=3"), headers={"X-API-Key": f"bill-{rig.run}"}
    ) as response:
        assert response.status == 200
        await response.read()
    await rig.used_becomes("bill", 35, "stream")
    added = await counted_since(rig, before)
    route = {"product": "stream", "route": "/stream/usage/{rest:path}"}
    assert added[("gateway_cost_reports_total", labels(**route, result="ok"))] == 1
    assert added[("gateway_cost_reports_total", labels(**route, result="missing"))] == 1


async def test_a_trailer_cut_short_reports_nothing(rig: Rig) -> None:
    """The upstream breaks off inside its trailer, or sends one over the 64 KiB bound, after
    its report's line: the body never ended, so that line was no trailer's and the hold
    stands (the billing plan does not refund)."""
    before = await rig.metrics()
    for query in ("trailer=2&cut", "trailer=3&trailer_kib=70", "trailer=4&trailer_kib=50"):
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.worker.proxy_port)
        try:
            writer.write(
                f"GET {STREAM}?{query} HTTP/1.1\r\nHost: t\r\nX-API-Key: bill-{rig.run}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            answer = await asyncio.wait_for(_until_closed(reader), 5)
        finally:
            writer.transport.abort()
        assert answer.startswith(b"HTTP/1.1 200 ")
        # The first two cut short (relayed as it came, with no last chunk); the third whole
        # (50 KiB is within bounds), answered at once with its length.
        whole = answer.endswith(
            b'Content-Length: 21\r\nConnection: close\r\n\r\n{"pad": "xxxxxxxxxx"}'
        )
        assert whole == ("trailer_kib=50" in query)
    await rig.used_becomes("bill", 24, "stream")
    added = await counted_since(rig, before)
    route = {"product": "stream", "route": "/stream/{rest:path}"}
    assert added[("gateway_cost_reports_total", labels(**route, result="cut"))] == 2
    assert added[("gateway_cost_reports_total", labels(**route, result="ok"))] == 1
    await asyncio.sleep(0.1)  # nothing more lands later
    assert await rig.used("bill", "stream") == 24


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """What came before the connection closed or was reset (a cut answer is aborted)."""
    read = b""
    try:
        while part := await reader.read(65536):
            read += part
    except ConnectionResetError:
        pass
    return read


async def test_fields_reported_apart_add_up(rig: Rig) -> None:
    """An Anthropic-style stream: input tokens in its first event, output tokens in its last
    message_delta (an earlier one said 2 so far); the route bills their sum."""
    url = rig.url("/stream/messages/chat?messages=25,15")
    async with rig.http.get(url, headers={"X-API-Key": f"bill-{rig.run}"}) as response:
        assert response.status == 200
        assert (await response.text()).count("event: ") == 9
    await rig.used_becomes("bill", 40, "stream")


async def test_weighted_fields_add_up_each_times_its_weight(rig: Rig) -> None:
    """The same stream on a route that prices an output token at 5 input tokens: 25 + 5 x 15."""
    url = rig.url("/stream/priced/chat?messages=25,15")
    async with rig.http.get(url, headers={"X-API-Key": f"bill-{rig.run}"}) as response:
        assert response.status == 200
        assert (await response.text()).count("event: ") == 9
    await rig.used_becomes("bill", 100, "stream")
