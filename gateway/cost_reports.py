"""Where an upstream says what a request cost (README, "Metering", "A cost the upstream
reports"): a header line of its answer's head or trailer (a route's `cost_header`), or fields of
its JSON body or of the JSON data of its server-sent events (a route's `cost_field`: one, or
several whose values, each times its weight, add up).

A `CostReading` (`HeaderCost` or `BodyCost`) reads beside the relay: the proxy hands it the
head, each body chunk as it leaves, and the end. The one exception is a small JSON body framed
by its length, which the proxy waits for and hands over whole before the head leaves
(`READ_BEFORE_HEAD`), so that the head's quota headers count it. What it finds goes to the
exchange's hook, which reads the number (or counts it missing, invalid or cut) and settles the
request by it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache

from gateway.config.model import MAX_COUNT, CostField
from gateway.http.headers import ExtraHeaders
from gateway.http.reply import HttpReply

__all__ = [
    "MAX_BODY_READ",
    "READ_BEFORE_HEAD",
    "BodyCost",
    "CostHook",
    "CostReading",
    "HeaderCost",
]

# Told the value in which an upstream reports what a request cost, or None when its answer has
# none, and that answer's status while its head is still to be sent (then it answers the
# gateway's header lines for it when the report changed them), or None when the report came
# after the head (a trailer, a body); and whether the answer broke off before its end could
# say it.
CostHook = Callable[[bytes | None, int | None, bool], ExtraHeaders | None]

# A JSON body, or one event's data, longer than this is not read for a cost: the reader keeps a
# copy of what it reads (a streamed answer is relayed as it comes, never held), so this bounds
# the copy (an event's line not yet ended included); usage figures sit in small bodies and
# small last events.
MAX_BODY_READ = 1 << 20

# A JSON body whose Content-Length is at most this is read whole before the answer's head
# leaves, so that the head's quota headers count its report. The upstream has sent it whole
# already, so waiting costs its transfer; the parse (only of a body that names a field) is
# one it would have had anyway, now before the head: 3.5 µs for a 2 KB chat answer, up to
# 0.9 ms for 64 KiB of numbers (bench/PROFILE.md, "Session 24"). Below the HTTP client's
# high-water mark, so that the whole body can queue without the upstream being paused.
READ_BEFORE_HEAD = 64 * 1024

_JSON = re.compile(rb"application/(?:[!#$&^_.+\w-]+\+)?json", re.ASCII)
_EVENT_STREAM = b"text/event-stream"
_NOT_READ, _JSON_BODY, _EVENTS = 0, 1, 2
_BOM = b"\xef\xbb\xbf"  # may lead an event stream, and is no part of its first line
# An LF, or a CRLF, right after an LF: a blank line ends there, whatever came before.
_BLANK_LINE_ENDS = (b"\n\n", b"\n\r\n")
_FIELD_KIND = 5  # the bytes of a line that say whether it is a data line (`data:`)
# A field's value with more digits than the largest count is out of range whatever it adds
# up with: refused as it came, before any arithmetic on it (see _added_up).
_MAX_COUNT_DIGITS = len(str(MAX_COUNT))


class HeaderCost:
    """A cost in a header line of the answer's head, else of a chunked body's trailer."""

    __slots__ = ("_hook", "_name")

    def __init__(self, name: bytes, hook: CostHook):
        self._name = name  # lower-cased, as raw lines are matched
        self._hook = hook

    def at_head(
        self, reply: HttpReply, extra: ExtraHeaders | None
    ) -> tuple[ExtraHeaders | None, bool]:
        """The final answer's head: the gateway's header lines for it (those the hook answers
        when the head reported the cost, or `extra` as they were), and whether the rest of
        the answer must come here (`feed`, then `at_end`): when the trailer may say it."""
        values = []
        chunked = False
        name = self._name
        for line, value in reply.raw_headers:
            lowered = line.lower()
            if lowered == name:
                values.append(value)
            elif lowered == b"transfer-encoding":
                chunked = True
        if not values and chunked and _has_body(reply):
            return extra, True
        settled = self._hook(_one_value(values), reply.status, False)
        return (extra if settled is None else settled), False

    def feed(self, chunk: bytes) -> None:
        """A chunk of the body: nothing to read in it."""

    def at_end(self, reply: HttpReply) -> None:
        """The body is done, or cut short (and then without a trailer)."""
        name = self._name
        values = [value for line, value in reply.trailer_lines if line.lower() == name]
        self._hook(_one_value(values), None, not reply.done)


class BodyCost:
    """Fields of a JSON body, or of the JSON data of server-sent events, whose values add up
    to the cost."""

    __slots__ = (
        "_body",
        "_clean",
        "_cr",
        "_data",
        "_data_size",
        "_fields",
        "_first",
        "_found",
        "_hook",
        "_kind",
        "_line",
        "_line_over",
        "_needles",
        "_over",
        "reads_whole_first",
    )

    def __init__(self, fields: tuple[CostField, ...], hook: CostHook):
        self._fields = fields
        self._hook = hook
        self._kind = _NOT_READ
        self._body = bytearray()  # a JSON body so far
        self._line = bytearray()  # an event stream's line not yet ended
        self._line_over = False  # it outgrew the bound: only its first _FIELD_KIND bytes kept
        self._cr = False  # the last piece ended in CR: an LF first in the next is its CRLF's
        self._first = True  # no line has ended yet (a BOM may lead the first)
        self._clean = False  # none of the above, nor data: nothing under way between events
        self._data: list[bytes] = []  # the data lines of the event under way
        self._data_size = 0  # their bytes; past MAX_BODY_READ the event is not read
        # Each field's value in the last event that held it, so far.
        self._found: list[bytes | None] = [None] * len(fields)
        self._over = False  # the JSON body outgrew MAX_BODY_READ
        self._needles = _needles_of(fields)
        # Set by at_head: the proxy waits for the whole body and hands it to at_whole before
        # the head leaves (a JSON body of at most READ_BEFORE_HEAD, framed by its length).
        self.reads_whole_first = False

    def at_head(
        self, reply: HttpReply, extra: ExtraHeaders | None
    ) -> tuple[ExtraHeaders | None, bool]:
        """The final answer's head: `extra` as it was (a body's report comes after the head),
        and whether the body must come here (`feed`, then `at_end`): when it can be read.

        An answer that has no body by HTTP's rules (to a HEAD, a 204, a 304, a WebSocket's
        101) tells the hook nothing: it could not report, and counting it `missing` would
        hide an upstream that stopped reporting among a route's HEADs; the hold stands."""
        if not _has_body(reply):
            return extra, False
        content_type = b""
        encoded = False
        length = b""
        for line, value in reply.raw_headers:
            lowered = line.lower()
            if lowered == b"content-type":
                content_type = value.split(b";", 1)[0].strip().lower()  # the media type
            elif lowered == b"content-encoding" and value.strip().lower() != b"identity":
                encoded = True
            elif lowered == b"content-length":
                length = value.strip()  # one valid length: the HTTP client saw to it
        if not encoded:
            # A compressed body cannot be read here; the gateway asks the upstream for none on
            # such a route (README), so only an upstream that ignores that sends one.
            if _JSON.fullmatch(content_type):
                self._kind = _JSON_BODY
                self.reads_whole_first = length.isdigit() and int(length) <= READ_BEFORE_HEAD
            elif content_type == _EVENT_STREAM:
                self._kind = _EVENTS
        if self._kind == _NOT_READ:
            self._hook(None, reply.status, False)
            return extra, False
        return extra, True

    def at_whole(self, reply: HttpReply, extra: ExtraHeaders | None) -> ExtraHeaders | None:
        """The whole body is in hand and the head still to be sent (`reads_whole_first`):
        the gateway's header lines for the answer (those the hook answers for its report, or
        `extra` as they were). Nothing more comes here."""
        settled = self._hook(self._json_report(reply.peek_all()), reply.status, False)
        return extra if settled is None else settled

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
        cut = not reply.done  # the body never ended: the JSON's end never came
        if self._kind == _JSON_BODY:
            found = None if self._over or cut else self._json_report(self._body)
            self._hook(found, None, cut)
        elif self._kind == _EVENTS:
            # An event without its closing blank line is no event (the stream was cut); one
            # that came before a cut said what it said.
            self._hook(_added_up(self._fields, self._found), None, cut)

    def _read_events(self, chunk: bytes) -> None:
        """Server-sent events (the WHATWG's rules: lines end in CR, LF or CRLF; a BOM may
        lead): each event's data lines, joined by LF, are read once its blank line ends it.
        Each byte is copied a bounded number of times, however the stream is cut in pieces.

        Only an event that names the field is read line by line, with the one under way when
        the piece came: whole events up to the piece's last blank line that do not are passed
        over in a few scans (a token's, as most are); nothing is under way after one.
        (A stream whose lines end in CR alone is read line by line.)"""
        if not self._clean:
            lf, crlf = chunk.find(b"\n\n"), chunk.find(b"\n\r\n")
            if lf < 0 and crlf < 0:
                self._read_lines(chunk)
                return
            end = crlf + 3 if lf < 0 or 0 <= crlf < lf else lf + 2
            self._read_lines(chunk[:end])  # the event under way, ended
            chunk = chunk[end:]
        if chunk.endswith(_BLANK_LINE_ENDS):
            cut = len(chunk)
        else:
            lf, crlf = chunk.rfind(b"\n\n"), chunk.rfind(b"\n\r\n")
            cut = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
        if cut and not self._names_a_field(chunk, cut):
            if cut == len(chunk):
                return
            chunk = chunk[cut:]
        if chunk:
            self._read_lines(chunk)

    def _read_lines(self, chunk: bytes) -> None:
        """A piece of an event stream, line by line."""
        if self._cr:
            self._cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]  # the rest of a CRLF, whose CR ended the line already
        if b"\r" in chunk:
            # Each line end made one LF, so that one split finds them all.
            self._cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        last = lines.pop()  # not ended yet
        if lines:
            if self._line or self._line_over:
                lines[0] = self._ended_line(lines[0])
            if self._first:
                self._first = False
                if lines[0].startswith(_BOM):
                    lines[0] = lines[0][len(_BOM) :]
            for line in lines:
                if not line:
                    if self._data:
                        self._end_event()
                elif line.startswith(b"data:"):
                    value = line[6:] if line.startswith(b"data: ") else line[5:]
                    self._data_size += len(value) + 1
                    if self._data_size <= MAX_BODY_READ:
                        self._data.append(value)
                    else:
                        self._data = [b"-"]  # too long to read: an event that says nothing
        if last:
            self._extend_line(last)
        self._clean = not (self._line or self._line_over or self._cr or self._first or self._data)

    def _extend_line(self, piece: bytes) -> None:
        """More of the line not yet ended. Within the bound (what the event's data holds
        already counted), it is kept whole; past it, only enough to tell a data line."""
        line = self._line
        if not self._line_over:
            if len(line) + len(piece) + self._data_size <= MAX_BODY_READ:
                line += piece
                return
            self._line_over = True
        if len(line) < _FIELD_KIND:
            line += piece[: _FIELD_KIND - len(line)]
        del line[_FIELD_KIND:]

    def _ended_line(self, rest: bytes) -> bytes:
        """The line under way, ended by `rest`: itself, or a comment line in its place when it
        outgrew the bound (a data line's event then being too long to read)."""
        self._extend_line(rest)
        line = bytes(self._line)
        self._line = bytearray()
        if self._line_over:
            self._line_over = False
            if line.startswith(b"data:"):
                self._data_size = MAX_BODY_READ + 1
                self._data = [b"-"]  # too long to read; ends as an event that says nothing
            return b":"
        return line

    def _end_event(self) -> None:
        data = b"\n".join(self._data)
        self._data = []
        self._data_size = 0
        if self._names_a_field(data):
            # Decoded as a browser's EventSource does: a byte that is not UTF-8 stands for
            # U+FFFD in the text, and leaves the JSON around it readable.
            for index, found in enumerate(self._fields_of(data.decode("utf-8", "replace"))):
                if found is not None:
                    self._found[index] = found

    def _json_report(self, body: bytes | bytearray) -> bytes | None:
        """What a whole JSON body reports. One that does not name a field is not parsed (an
        error page, say): the parse of a large body holds up the worker's other requests
        (bench/PROFILE.md, "Session 23")."""
        if not self._names_a_field(body):
            return None
        return _added_up(self._fields, self._fields_of(body))

    def _names_a_field(self, data: bytes | bytearray, end: int | None = None) -> bool:
        """Whether `data` (up to `end`) holds the last name of any field, quoted."""
        return any(data.find(needle, 0, end) >= 0 for needle in self._needles)

    def _fields_of(self, text: str | bytes | bytearray) -> list[bytes | None]:
        """Each field's value in a JSON document, as its text would read (a whole number as
        its digits, anything else as JSON, for the hook to refuse), or None where the document
        is not JSON (or too deep to read) or has no such field."""
        try:
            document: object = json.loads(text)
        except (ValueError, RecursionError):
            # RecursionError: json's decoder recurses per level, and a document nested deeper
            # than the interpreter allows is valid JSON all the same; it reports nothing, and
            # the answer passes on as it came.
            return [None] * len(self._fields)
        return [_value_at(document, one.path) for one in self._fields]


# What reads a route's reported cost: one per request of such a route.
CostReading = HeaderCost | BodyCost


def _has_body(reply: HttpReply) -> bool:
    return not reply.head_only and reply.status not in (101, 204, 304)


@lru_cache(maxsize=256)
def _needles_of(fields: tuple[CostField, ...]) -> tuple[bytes, ...]:
    """Each field's last name, quoted: only events that hold one are parsed (the usage event,
    not each token's). Made once per config value, not per request."""
    return tuple(b'"%s"' % one.path[-1].encode() for one in fields)


def _value_at(document: object, path: tuple[str, ...]) -> bytes | None:
    value = document
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return None
        value = value[name]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    return json.dumps(value)[:40].encode()


def _added_up(fields: tuple[CostField, ...], values: list[bytes | None]) -> bytes | None:
    """The fields' values as one report: the sum of each that was said times its weight, when
    each is a whole number's digits within the largest count's (a field said nowhere adds
    nothing); the first that is not (for the hook to refuse, naming it); or None when none
    was said. A lone value of weight 1 goes to the hook as it came, to be read there.

    A value past the largest count is refused before it is multiplied or added: JSON's
    numbers have no bound, and a result past Python's 4,300 digits cannot be written out
    (ValueError), which would make an upstream's answer a 500 of the gateway's."""
    said = [(f.weight, value) for f, value in zip(fields, values, strict=True) if value is not None]
    if not said:
        return None
    if len(said) == 1 and said[0][0] == 1:
        return said[0][1]
    for _, value in said:
        # JSON writes no leading zeros (_value_at writes the number anew): the length is the
        # number's size.
        if not value.isdigit() or len(value) > _MAX_COUNT_DIGITS:
            return value
    return str(sum(weight * int(value) for weight, value in said)).encode()


def _one_value(values: list[bytes]) -> bytes | None:
    """The values of a header's lines as one: the value, or several joined with commas as one
    line holding them all would be (whether they agree is the hook's to read)."""
    if not values:
        return None
    return values[0].strip() if len(values) == 1 else b", ".join(v.strip() for v in values)
