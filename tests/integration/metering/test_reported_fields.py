"""A cost the upstream states in its body (a route's cost_field), end to end, for answers whose
exact bytes a test chooses: a raw upstream (tests.support.reporting_upstream, `raw=NAME`)
behind a gateway on memory, a real redis-server and a real Redis Cluster (the rig fixture).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import accesslog
from tests.integration.metering.test_reported_costs import counted_since, labels
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.metering_rig import Rig, eventually
from tests.support.recording_upstream import recording_upstream
from tests.support.reporting_upstream import HUNG_UP, RAW_ANSWERS
from tests.support.sockets import free_port

USAGE = "/stream/usage/chat"  # cost: 10 held; cost_field: usage.total_tokens
ROUTE = {"product": "stream", "route": "/stream/usage/{rest:path}"}


def answer(content_type: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        content_type,
        len(body),
        body,
    )


async def fetch(rig: Rig, name: str, split: int | None = None) -> tuple[int, bytes]:
    """The raw answer `name` through the gateway with the billing key: status and body."""
    query = f"raw={name}" + ("" if split is None else f"&split={split}")
    url = rig.url(f"{USAGE}?{query}")
    async with rig.http.get(url, headers={"X-API-Key": f"bill-{rig.run}"}) as response:
        return response.status, await response.read()


async def test_a_document_nested_too_deep_to_read_passes_on_and_reports_nothing(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON nested deeper than the reader can follow (valid all the same): the answer reaches
    the client as it came, is logged as the upstream's 200 (not a 500 of the gateway's, which
    the billing plan's refund_on: [5xx] would give back), and the hold stands."""
    nested = b"[" * 100_000 + b"]" * 100_000
    document = b'{"usage": {"total_tokens": 3}, "deep": %s}' % nested
    RAW_ANSWERS["deep-json"] = answer(b"application/json", document)
    RAW_ANSWERS["deep-event"] = answer(b"text/event-stream", b"data: %s\n\n" % document)
    before = await rig.metrics()
    capsys.readouterr()
    for name in ("deep-json", "deep-event"):
        status, body = await fetch(rig, name)
        assert status == 200
        assert body.endswith(nested + b"}" + (b"\n\n" if name == "deep-event" else b""))
    await rig.used_becomes("bill", 20, "stream")
    mine = logged_by_bill(rig, capsys)
    assert [(line["status"], line["units"]) for line in mine] == [(200, 10), (200, 10)]
    added = await counted_since(rig, before)
    assert added[("gateway_cost_reports_total", labels(**ROUTE, result="missing"))] == 2


async def test_events_are_read_as_a_browser_reads_them(rig: Rig) -> None:
    """Lines that end in CR alone, a BOM before the first event, a byte that is not UTF-8 in
    the usage event's text: an EventSource reads each of these streams' usage event, and so
    does the gateway (the WHATWG's rules), relayed in pieces of 5 bytes."""
    token = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
    done = b"data: [DONE]\n\n"
    streams = {
        "cr-events": (token + b'data: {"usage": {"total_tokens": 3}}\n\n' + done).replace(
            b"\n", b"\r"
        ),
        "bom-events": b"\xef\xbb\xbf" + b'data: {"usage": {"total_tokens": 4}}\n\n' + done,
        "latin1-events": token
        + b'data: {"model": "\xe9", "usage": {"total_tokens": 5}}\n\n'
        + done,
    }
    before = await rig.metrics()
    for name, stream in streams.items():
        RAW_ANSWERS[name] = answer(b"text/event-stream", stream)
        assert await fetch(rig, name, split=5) == (200, stream)
    await rig.used_becomes("bill", 3 + 4 + 5, "stream")
    added = await counted_since(rig, before)
    assert added[("gateway_cost_reports_total", labels(**ROUTE, result="ok"))] == 3


CHAT = """
products:
  llm:
    upstream: {{url: "http://127.0.0.1:{port}"}}
    routes:
      - path: /v1/chat/completions
        cost: 100
        cost_field: usage.total_tokens
      - path: /v1/{{rest:path}}
plans:
  metered:
    quota: {{limit: 100000, per: month}}
keys:
  - {{name: client, key: secret, plans: {{llm: metered}}}}
"""


@pytest.mark.parametrize("storage", ["answering", "away"])
async def test_a_cost_field_route_never_passes_accept_encoding_on(
    tmp_path: Path, storage: str
) -> None:
    """The route's upstream is asked for its body as it is, whether the storage answers or
    not (`on_error: allow` reads no cost then, but the route is the same route, and its
    client gets what it gets at other times); another route's upstream gets the line."""
    url = "memory://" if storage == "answering" else f"redis://127.0.0.1:{free_port()}/0"
    server = worker_server_yaml(storage_url=url, on_error="allow")
    async with recording_upstream() as upstream:
        config = write_config(tmp_path, CHAT.format(port=upstream.port), server=server)
        async with running_gateway(config) as worker, aiohttp.ClientSession() as http:
            for path in ("/v1/chat/completions", "/v1/models"):
                url = f"http://127.0.0.1:{worker.proxy_port}{path}"
                headers = {"X-API-Key": "secret", "Accept-Encoding": "gzip"}
                async with http.get(url, headers=headers) as response:
                    assert response.status == 200
        chat, models, _ = bytes(upstream.received).lower().split(b"\r\n\r\n")
    assert chat.startswith(b"get /v1/chat/completions ")
    assert b"accept-encoding" not in chat
    assert b"\r\naccept-encoding: gzip\r\n" in models


async def test_an_answer_without_a_body_keeps_the_hold_and_reports_nothing(rig: Rig) -> None:
    """A HEAD's answer and a 204 have no body by HTTP's rules, so cannot carry the field: the
    hold stands, and no report is counted, not even a missing one (which would hide an
    upstream that stopped reporting among a route's HEADs)."""
    head = b"Content-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    RAW_ANSWERS["no-content"] = b"HTTP/1.1 204 No Content\r\n" + head[:32] + b"\r\n"
    RAW_ANSWERS["head-only"] = b"HTTP/1.1 200 OK\r\n" + head
    before = await rig.metrics()
    assert (await fetch(rig, "no-content"))[0] == 204
    url = rig.url(f"{USAGE}?raw=head-only")
    async with rig.http.head(url, headers={"X-API-Key": f"bill-{rig.run}"}) as response:
        assert response.status == 200
    await rig.used_becomes("bill", 20, "stream")
    added = await counted_since(rig, before)
    results = ("ok", "missing", "invalid", "cut")
    series = [("gateway_cost_reports_total", labels(**ROUTE, result=r)) for r in results]
    counted = [added.get(one) for one in series]
    assert not any(counted), counted  # each absent, or 0 where another test made the series


def logged_by_bill(rig: Rig, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The access-log lines of the billing key written since the last look (the serving worker
    batches its lines: flushed first)."""
    accesslog.flush_access_log()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    return [line for line in lines if line["key"] == f"bill-{rig.run}"]


def usage_body(size: int, tokens: int = 3) -> bytes:
    """A JSON body of exactly `size` bytes that reports `tokens`."""
    start, end = b'{"usage": {"total_tokens": %d}, "pad": "' % tokens, b'"}'
    return start + b"x" * (size - len(start) - len(end)) + end


async def test_a_small_json_answer_counts_its_report_in_its_own_quota_headers(
    rig: Rig,
) -> None:
    """A JSON body of at most 64 KiB, framed by its length, is read before its head leaves:
    X-Quota-Remaining says what settling at the report leaves, even when the body comes in
    pieces after the head. One byte more, and the head says what the admission left."""
    RAW_ANSWERS["at-bound"] = answer(b"application/json", usage_body(64 * 1024))
    RAW_ANSWERS["past-bound"] = answer(b"application/json", usage_body(64 * 1024 + 1))
    RAW_ANSWERS["in-pieces"] = answer(b"application/json; charset=utf-8", usage_body(300))
    remaining = []
    for name, split in (("at-bound", None), ("in-pieces", 40), ("past-bound", None)):
        query = f"raw={name}" + ("" if split is None else f"&split={split}")
        status, headers, body = await rig.get("bill", f"{USAGE}?{query}")
        assert (status, body["usage"]) == (200, {"total_tokens": 3})
        remaining.append(headers["X-Quota-Remaining"])
        await rig.used_becomes("bill", 3 * len(remaining), "stream")
    # 100 less 3, then 100 less 6; then 6 used and 10 held: 84, the admission's
    assert remaining == ["97", "94", "84"]


async def test_a_small_json_body_that_breaks_off_is_a_502_and_reports_nothing(
    rig: Rig,
) -> None:
    """The upstream closes before the whole body came: not a byte of the answer has left, so
    the client gets the 502 in its place (refunded under the plan's refund_on: [5xx]), and
    the report counts as cut."""
    whole = answer(b"application/json", usage_body(200))
    RAW_ANSWERS["breaks-off"] = whole[: len(whole) - 100]
    before = await rig.metrics()
    status, headers, body = await rig.get("bill", f"{USAGE}?raw=breaks-off&cut")
    assert (status, headers["Content-Type"]) == (502, "application/problem+json")
    assert body["code"] == "bad_gateway"
    await rig.used_becomes("bill", 0, "stream")
    added = await counted_since(rig, before)
    assert added[("gateway_cost_reports_total", labels(**ROUTE, result="cut"))] == 1


async def test_a_client_that_leaves_while_a_small_json_body_comes_is_let_go(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    """The client leaves while the gateway waits for the rest of the body: the request ends
    as a 499 with its hold (the billing plan refunds 5xx only), and the upstream connection
    is closed rather than waited on."""
    whole = answer(b"application/json", usage_body(200))
    RAW_ANSWERS["stalls"] = whole[: len(whole) - 100]
    HUNG_UP.discard("stalls")  # noted by the run of another storage, in this same process
    capsys.readouterr()
    _, writer = await asyncio.open_connection("127.0.0.1", rig.worker.proxy_port)
    request = f"GET {USAGE}?raw=stalls&hang HTTP/1.1\r\nHost: t\r\nX-API-Key: bill-{rig.run}\r\n"
    writer.write(request.encode() + b"\r\n")
    await rig.used_becomes("bill", 10, "stream")  # admitted; its answer's head never comes
    writer.transport.abort()
    await eventually(lambda: hung_up("stalls"), True)
    logged: list[dict[str, Any]] = []

    async def lines_logged() -> int:
        logged.extend(logged_by_bill(rig, capsys))
        return len(logged)

    await eventually(lines_logged, 1)
    assert [(line["status"], line["units"]) for line in logged] == [(499, 10)]
    assert await rig.used("bill", "stream") == 10


async def hung_up(name: str) -> bool:
    return name in HUNG_UP


async def test_a_value_with_thousands_of_digits_is_an_invalid_report_not_a_500(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON's whole numbers have no bound: a field of 4,300 digits (as many as Python reads),
    weighted or added to another, is a report out of range, refused as such; the answer
    reaches the client as it came, logged as the upstream's 200, and the hold stands (not a
    500 of the gateway's, which the billing plan's refund_on: [5xx] would give back)."""
    huge = b"9" * 4300
    document = b'{"message": {"usage": {"input_tokens": %s}}, "usage": {"output_tokens": %s}}'
    body = document % (b"1", huge)  # output tokens weigh 5 on /stream/priced/
    stream = b"data: %s\n\ndata: [DONE]\n\n" % (document % (huge, huge))  # added up
    RAW_ANSWERS["huge-weighted"] = answer(b"application/json", body)
    RAW_ANSWERS["huge-summed"] = answer(b"text/event-stream", stream)
    before = await rig.metrics()
    capsys.readouterr()
    for path, name, whole in (
        ("/stream/priced/chat", "huge-weighted", body),
        ("/stream/messages/chat", "huge-summed", stream),
    ):
        url = rig.url(f"{path}?raw={name}")
        async with rig.http.get(url, headers={"X-API-Key": f"bill-{rig.run}"}) as response:
            assert (response.status, await response.read()) == (200, whole)
    await rig.used_becomes("bill", 20, "stream")
    mine = logged_by_bill(rig, capsys)
    assert [(line["status"], line["units"]) for line in mine] == [(200, 10), (200, 10)]
    added = await counted_since(rig, before)
    for route in ("/stream/priced/{rest:path}", "/stream/messages/{rest:path}"):
        invalid = labels(product="stream", route=route, result="invalid")
        assert added[("gateway_cost_reports_total", invalid)] == 1
