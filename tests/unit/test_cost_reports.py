"""BodyCost (gateway.cost_reports) reading server-sent events however their bytes arrive.

The answer's head is a real upstream's (a raw one on loopback, read by the gateway's HTTP
client); the body's pieces are the test's, split where it chooses, and handed over as the proxy
hands over what it relays.
"""

from __future__ import annotations

import json
import random
import re
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import suppress

import pytest

from gateway.config.model import CostField
from gateway.cost_reports import MAX_BODY_READ, BodyCost
from gateway.http.reply import HttpReply
from tests.support.raw_upstream import keep_answering, raw_upstream
from tests.support.upstream_client import HOST, client_for

FIELD = (CostField(("usage", "total_tokens")),)
TOKEN = b'data: {"choices": [{"delta": {"content": "hi"}}], "usage": null}\n\n'
# The usage event over two data lines, one without a space after its colon.
USAGE = b'data: {"choices": [], "usage":\ndata:{"total_tokens": 7}}\n\n'
# What a streaming chat answer holds: a comment, named events with ids, the usage event and
# more events after it.
STREAM = (
    b": keep-alive\n\n"
    + b"event: message\nid: 1\n"
    + TOKEN
    + b"retry: 100\nid: 2\n"
    + USAGE
    + TOKEN
    + b": ping\n\ndata: [DONE]\n\n"
)


@pytest.fixture
async def events_reply() -> AsyncIterator[HttpReply]:
    """The head of a real upstream's `text/event-stream` answer."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 0\r\n\r\n"
    async with raw_upstream(keep_answering(answer)) as upstream, client_for(upstream.port) as c:
        reply = await c.send("GET", "/x", HOST, None)
        yield reply
        reply.finish()


def read(reply: HttpReply, pieces: list[bytes]) -> list[bytes | None]:
    """What a reading of `pieces` of that answer's body tells its hook."""
    told: list[bytes | None] = []

    def hook(value: bytes | None, status: int | None, cut: bool) -> None:
        told.append(value)

    reading = BodyCost(FIELD, hook)
    assert reading.at_head(reply, None)[1]
    for piece in pieces:
        reading.feed(piece)
    reading.at_end(reply)
    return told


LINE_ENDS: dict[str, Callable[[bytes], bytes]] = {
    "LF": lambda stream: stream,
    "CRLF": lambda stream: stream.replace(b"\n", b"\r\n"),
    "CR": lambda stream: stream.replace(b"\n", b"\r"),
    # Each line end in turn, so that a CR and an LF meet in every order.
    "mixed": lambda stream: b"".join(
        line + (b"\n", b"\r\n", b"\r")[n % 3] for n, line in enumerate(stream.split(b"\n")[:-1])
    ),
}


@pytest.mark.parametrize("line_ends", LINE_ENDS)
def test_a_stream_split_anywhere_reports_its_usage_event(
    events_reply: HttpReply, line_ends: str
) -> None:
    """CR, LF and CRLF each end a line (the WHATWG's rules, as a browser's EventSource reads
    them), and a BOM may lead the stream: wherever the stream is cut in two, and byte by
    byte, the usage event is read."""
    stream = LINE_ENDS[line_ends](STREAM)
    assert read(events_reply, [stream]) == [b"7"]
    for at in range(1, len(stream)):
        assert read(events_reply, [stream[:at], stream[at:]]) == [b"7"], at
    assert read(events_reply, [stream[at : at + 1] for at in range(len(stream))]) == [b"7"]


def as_a_browser_reads(stream: bytes) -> bytes | None:
    """The report of `stream` by the WHATWG's rules, written plainly over the whole of it: the
    total_tokens of the last event whose data is JSON with usage.total_tokens, as its digits."""
    text = stream.decode("utf-8", "replace").removeprefix("\ufeff")
    lines = re.split("\r\n|\r|\n", text)[:-1]  # the last is not ended
    found, data = None, []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
        elif not line and data:
            with suppress(ValueError, KeyError, TypeError):  # not JSON, or not that field
                found = str(json.loads("\n".join(data))["usage"]["total_tokens"]).encode()
            data = []
    return found


def test_streams_of_every_shape_cut_anywhere_report_as_a_browser_reads_them(
    events_reply: HttpReply,
) -> None:
    """Streams of token events, usage events (several: the last counts), comments, named
    events, `[DONE]`, each line ending in LF, CRLF or CR, cut into pieces at random (seeded):
    what the reading reports is what the plain reading of the whole says."""
    shuffle = random.Random(2026)
    events = [
        [b'data: {"choices": [{"delta": {"content": "a\\nb"}}], "usage": null}', b""],
        [b'data: {"usage": {"total_tokens": %d}}', b""],
        [b'data: {"usage":', b'data:{"total_tokens": %d}}', b""],
        [b": ping", b""],
        [b"event: usage", b"id: 7", b'data: {"usage": {"total_tokens": %d}, "x": "\xc3\xa9"}', b""],
        [b"data: [DONE]", b""],
    ]
    for _ in range(300):
        lines = [
            line.replace(b"%d", b"%d" % shuffle.randrange(1000))
            for _ in range(shuffle.randrange(1, 12))
            for line in shuffle.choice(events)
        ]
        stream = b"".join(line + shuffle.choice((b"\n", b"\r\n", b"\r")) for line in lines)
        cuts = sorted(shuffle.sample(range(1, len(stream)), min(len(stream) - 1, 20)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert read(events_reply, pieces) == [as_a_browser_reads(stream)], stream


def test_a_bom_before_the_first_event_is_not_part_of_it(events_reply: HttpReply) -> None:
    """A UTF-8 BOM may lead the stream (WHATWG), and arrive in pieces itself."""
    stream = b"\xef\xbb\xbf" + USAGE + b"data: [DONE]\n\n"
    for at in range(1, len(stream)):
        assert read(events_reply, [stream[:at], stream[at:]]) == [b"7"], at
    assert read(events_reply, [stream[at : at + 1] for at in range(len(stream))]) == [b"7"]


def test_bytes_that_are_not_utf8_are_read_as_a_browser_reads_them(
    events_reply: HttpReply,
) -> None:
    """An event stream is UTF-8 decoded with replacement characters (WHATWG): a stray byte in
    the usage event's text leaves a JSON document that says the cost."""
    usage = b'data: {"model": "gpt-\xff", "usage": {"total_tokens": 7}}\n\n'
    assert read(events_reply, [TOKEN, usage, b"data: [DONE]\n\n"]) == [b"7"]


def test_a_long_line_arriving_in_small_pieces_costs_time_in_proportion(
    events_reply: HttpReply,
) -> None:
    """16 MiB of one data line in 512-byte pieces (a streamed image, a slow link): each piece
    is kept once, not the whole line copied again with each one; the event is too long to be
    read, the usage event after it is."""
    piece = b"x" * 512
    pieces = [b"data: "] + [piece] * (16 * 2**20 // len(piece)) + [b"\n\n", USAGE]
    started = time.process_time()
    assert read(events_reply, pieces) == [b"7"]
    # About 0.05 s of CPU here; copying the line so far with each piece took seconds.
    assert time.process_time() - started < 1.0


def test_an_event_under_way_holds_at_most_the_bound(events_reply: HttpReply) -> None:
    """An event's data lines and its line not yet ended together hold no more than
    MAX_BODY_READ in memory, however the event goes on: what a request in flight keeps."""
    told: list[bytes | None] = []
    reading = BodyCost(FIELD, lambda value, status, cut: told.append(value))
    assert reading.at_head(events_reply, None)[1]
    line = b"data: " + b"y" * 4090 + b"\n"
    lines = [line] * (MAX_BODY_READ // len(line))
    tail = [b"data: "] + [b"z" * 4096] * 255  # nearly 1 MiB more, its line not ended
    tracemalloc.start()
    try:
        for piece in lines + tail:
            reading.feed(piece)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < MAX_BODY_READ * 1.1
    reading.feed(b"\n\n" + USAGE)
    reading.at_end(events_reply)
    assert told == [b"7"]


@pytest.mark.parametrize(
    ("events", "told"),
    [
        # Each field's last value, added up; an event that names one field leaves the other.
        ([b'{"a": {"n": 3}, "b": 1}', b'{"b": 2}', b'{"b": 4}'], b"7"),
        ([b'{"b": 4}'], b"4"),  # a field said nowhere adds nothing
        ([b'{"a": {"n": 3}}', b'{"b": 2.5}'], b"2.5"),  # not a whole number: for the hook
        ([b'{"c": 1}'], None),  # neither said: a missing report
    ],
)
def test_fields_reported_apart_add_up(
    events_reply: HttpReply, events: list[bytes], told: bytes | None
) -> None:
    assert hear(events_reply, (CostField(("a", "n")), CostField(("b",))), events) == [told]


@pytest.mark.parametrize(
    ("events", "told"),
    [
        # Each field's last value times its weight, added up.
        ([b'{"a": {"n": 3}, "b": 1}', b'{"b": 2}'], b"13"),
        ([b'{"b": 4}'], b"20"),  # one field said: its value times its weight
        ([b'{"a": {"n": 3}}'], b"3"),
        ([b'{"b": 0}'], b"0"),
        ([b'{"a": {"n": 3}, "b": "4"}'], b'"4"'),  # a string: for the hook to refuse
        ([b'{"b": -2}'], b"-2"),  # a negative number, the same
        ([b'{"b": 2.0}'], b"2.0"),  # not an integer, though whole
        # Past the largest count (10^12): refused as it came, never multiplied or added.
        ([b'{"a": {"n": 3}, "b": 10000000000000}'], b"10000000000000"),
        ([b'{"c": 1}'], None),
    ],
)
def test_weighted_fields_add_up_each_times_its_weight(
    events_reply: HttpReply, events: list[bytes], told: bytes | None
) -> None:
    fields = (CostField(("a", "n")), CostField(("b",), weight=5))
    assert hear(events_reply, fields, events) == [told]


def hear(
    reply: HttpReply, fields: tuple[CostField, ...], events: list[bytes]
) -> list[bytes | None]:
    """What a reading of these events' data tells its hook."""
    heard: list[bytes | None] = []
    reading = BodyCost(fields, lambda value, status, cut: heard.append(value))
    assert reading.at_head(reply, None)[1]
    for event in events:
        reading.feed(b"data: " + event + b"\n\n")
    reading.at_end(reply)
    return heard
