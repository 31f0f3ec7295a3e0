"""Where an upstream says what a request cost (README, "Metering", "A cost the upstream
reports"): a header line of its answer's head or trailer (a route's `cost_header`), or a field of
its JSON body or of the JSON data of its server-sent events (a route's `cost_field`).

`CostReading` reads beside the relay and never holds the answer back: the proxy hands it the
head, each body chunk as it leaves, and the end. What it finds goes to the exchange's hook,
which reads the number (or counts it missing or invalid) and settles the request by it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from gateway.http.headers import ExtraHeaders
from gateway.http.reply import HttpReply

__all__ = ["MAX_BODY_READ", "CostHook", "CostReading"]

# Told the value in which an upstream reports what a request cost, or None when its answer has
# none, and that answer's status while its head is still to be sent (then it answers the
# gateway's header lines for it when the report changed them), or None when the report came
# after the head (a trailer, a body); and whether the answer broke off before its end could
# say it.
CostHook = Callable[[bytes | None, int | None, bool], ExtraHeaders | None]

# A JSON body, or one event's data, longer than this is not read for a cost: the reader keeps a
# copy of what it reads (a streamed answer is relayed as it comes, never held), so this bounds
# the copy; usage figures sit in small bodies and small last events.
MAX_BODY_READ = 1 << 20

_JSON = re.compile(rb"application/(?:[!#$&^_.+\w-]+\+)?json", re.ASCII)
_EVENT_STREAM = b"text/event-stream"
_NOT_READ, _JSON_BODY, _EVENTS = 0, 1, 2


class CostReading:
    """One answer's reading of its cost, for one request of a route that reports one."""

    __slots__ = (
        "_body",
        "_data",
        "_data_size",
        "_field",
        "_found",
        "_header",
        "_hook",
        "_kind",
        "_line",
        "_needle",
        "_over",
    )

    def __init__(self, header: bytes | None, field: tuple[str, ...] | None, hook: CostHook):
        self._header = header  # lower-cased, as raw lines are matched
        self._field = field
        self._hook = hook
        self._kind = _NOT_READ
        self._body = bytearray()  # a JSON body so far
        self._line = bytearray()  # an event stream's line not yet ended
        self._data: list[bytes] = []  # the data lines of the event under way
        self._data_size = 0  # their bytes; past MAX_BODY_READ the event is not read
        self._found: bytes | None = None  # the last event's report so far
        self._over = False  # the JSON body outgrew MAX_BODY_READ
        # Only events that name the field's last part are parsed (the usage event, not each
        # token's): a cheap substring test first.
        self._needle = b'"%s"' % field[-1].encode() if field else b""

    def at_head(
        self, reply: HttpReply, extra: ExtraHeaders | None
    ) -> tuple[ExtraHeaders | None, bool]:
        """The final answer's head: the gateway's header lines for it (those the hook answers
        when the head reported the cost, or `extra` as they were), and whether the rest of
        the answer must come here (`feed`, then `at_end`)."""
        values = []
        chunked = False
        content_type = b""
        encoded = False
        name = self._header
        for line, value in reply.raw_headers:
            lowered = line.lower()
            if lowered == name:
                values.append(value)
            elif lowered == b"transfer-encoding":
                chunked = True
            elif lowered == b"content-type":
                content_type = value.split(b";", 1)[0].strip().lower()  # the media type
            elif lowered == b"content-encoding" and value.strip().lower() != b"identity":
                encoded = True
        has_body = not reply.head_only and reply.status not in (101, 204, 304)
        if name is not None:
            if not values and chunked and has_body:
                return extra, True  # the trailer may say it
            settled = self._hook(_one_value(values), reply.status, False)
            return (extra if settled is None else settled), False
        if has_body and not encoded:
            # A compressed body cannot be read here; the gateway asks the upstream for none on
            # such a route (README), so only an upstream that ignores that sends one.
            if _JSON.fullmatch(content_type):
                self._kind = _JSON_BODY
            elif content_type == _EVENT_STREAM:
                self._kind = _EVENTS
        if self._kind == _NOT_READ:
            self._hook(None, reply.status, False)
            return extra, False
        return extra, True

    def feed(self, chunk: bytes) -> None:
        """A chunk of the body, as it leaves for the client."""
        if self._kind == _JSON_BODY:
            if not self._over:
                if len(self._body) + len(chunk) > MAX_BODY_READ:
                    self._over = True
                    self._body = bytearray()
                else:
                    self._body += chunk
        elif self._kind == _EVENTS:
            self._read_events(chunk)

    def at_end(self, reply: HttpReply) -> None:
        """The body is done, or cut short: tell the hook what it said."""
        cut = not reply.done  # the body never ended: its end (a trailer, the JSON's) never came
        if self._header is not None:
            name = self._header
            values = [value for line, value in reply.trailer_lines if line.lower() == name]
            self._hook(_one_value(values), None, cut)
        elif self._kind == _JSON_BODY:
            found = None if self._over or cut else self._field_of(bytes(self._body))
            self._hook(found, None, cut)
        elif self._kind == _EVENTS:
            # An event without its closing blank line is no event (the stream was cut); one
            # that came before a cut said what it said.
            self._hook(self._found, None, cut)

    def _read_events(self, chunk: bytes) -> None:
        """Server-sent events (the WHATWG rules, lines ending in LF or CRLF): each event's
        data lines, joined by LF, are read once its blank line ends it."""
        lines = chunk.split(b"\n")
        if self._line:
            if len(self._line) + len(lines[0]) > MAX_BODY_READ:
                self._line = bytearray(b"-")  # not a data line any more: dropped at its end
            else:
                self._line += lines[0]
            lines[0] = bytes(self._line)
        last = lines.pop()  # not ended yet
        self._line = bytearray(last if len(last) <= MAX_BODY_READ else b"-")
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    self._end_event()
            elif line.startswith(b"data:"):
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                self._data_size += len(value) + 1
                if self._data_size <= MAX_BODY_READ:
                    self._data.append(value)
                else:
                    self._data = [b"-"]  # too long to read; ends as an event that says nothing

    def _end_event(self) -> None:
        data = b"\n".join(self._data)
        self._data = []
        self._data_size = 0
        if self._needle in data:
            found = self._field_of(data)
            if found is not None:
                self._found = found

    def _field_of(self, text: bytes) -> bytes | None:
        """The field's value in a JSON document, as its text would read (a whole number as
        its digits, anything else as JSON, for the hook to refuse), or None if the document
        is not JSON (or too deep to read) or has no such field."""
        try:
            value: object = json.loads(text)
        except (ValueError, RecursionError):
            # RecursionError: json's decoder recurses per level, and a document nested deeper
            # than the interpreter allows is valid JSON all the same; it reports nothing, and
            # the answer passes on as it came.
            return None
        assert self._field is not None
        for name in self._field:
            if not isinstance(value, dict) or name not in value:
                return None
            value = value[name]
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value).encode()
        return json.dumps(value)[:40].encode()


def _one_value(values: list[bytes]) -> bytes | None:
    """The values of a header's lines as one: the value, or several joined with commas as one
    line holding them all would be (whether they agree is the hook's to read)."""
    if not values:
        return None
    return values[0].strip() if len(values) == 1 else b", ".join(v.strip() for v in values)
