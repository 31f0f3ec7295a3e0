"""The access log (README, "Access log"): one JSON object per answered request, one line each, on
stdout, where a container runtime or a log shipper picks it up.

    {"time": "2025-05-01T12:00:00.123Z", "request_id": "...", "method": "GET",
     "path": "/soccer/v4/en/...", "status": 200, "code": "upstream", "product": "soccer",
     "route": "/soccer/v4/{lang}/...", "key": "acme-trial", "plan": "trial",
     "duration_ms": 12.345, "upstream_ms": 10.2, "bytes_sent": 512}

`time` is when the request head was read (UTC, milliseconds). `key` is the key's name from the
config, never the secret; `path` carries no query string, where a key may travel. `upstream_ms`
is null when the request was not proxied.

Setting GATEWAY_ACCESS_LOG=off (or 0, false, no) in the environment turns the log off, for
benchmarks; it is read once, at import.

Lines are written in batches, not one system call each. A serving worker (`start_batching`)
gathers its lines and writes them when the next line would take the batch past PIPE_BUF (4,096
bytes on Linux) and at least once a second; `stop_batching` writes what is left at shutdown.
Each batch is whole lines in one write(2) of at most PIPE_BUF bytes, the size up to which the
kernel writes to a pipe atomically: workers sharing one stdout pipe (a container runtime's)
never split or interleave each other's lines. A single line longer than PIPE_BUF is written
alone, and only its own atomicity is then up to the kernel. Outside a serving worker (scripts,
tests without a worker) each line is written at once, as it comes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import sys
import time

from gateway.record import RequestRecord

ACCESS_LOG_ENV = "GATEWAY_ACCESS_LOG"
_OFF_VALUES = frozenset({"off", "0", "false", "no"})

_enabled = os.environ.get(ACCESS_LOG_ENV, "on").strip().lower() not in _OFF_VALUES


def access_log_enabled() -> bool:
    return _enabled


def set_access_log_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


# Most lines of a busy second share their date and time; formatting that once per second is
# cheaper than strftime per request. Under load several requests also share their millisecond
# (a loop turn answers many): the whole text of the last one is kept too (bench/PROFILE.md,
# "Session 3").
_cached_second = -1
_cached_prefix = ""
_cached_millisecond = -1
_cached_time = ""


def format_time(unix_time: float) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. 2025-05-01T12:00:00.123Z."""
    global _cached_second, _cached_prefix, _cached_millisecond, _cached_time
    # Scaling first keeps e.g. .3 from becoming 299 ms through the float's representation error.
    millisecond = int(unix_time * 1000)
    if millisecond == _cached_millisecond:
        return _cached_time
    second, millis = divmod(millisecond, 1000)
    if second != _cached_second:
        _cached_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _cached_second = second
    _cached_millisecond = millisecond
    _cached_time = _cached_prefix + _MILLISECOND_TEXTS[millis]
    return _cached_time


# ".000Z" to ".999Z": a lookup instead of formatting with a spec, a fifth of the cost of that
# f-string (bench/PROFILE.md, "Session 4").
_MILLISECOND_TEXTS = tuple(f".{millis:03d}Z" for millis in range(1000))


# The C string encoder json.dumps itself uses (ASCII-only output); building the object's text
# around it skips the dict and the generic encoder, the bulk of a line's cost.
_string = json.encoder.encode_basestring_ascii


def milliseconds(seconds: float) -> str:
    """The JSON number of `seconds` in milliseconds rounded to 3 decimals, as
    repr(round(ms, 3)) writes it, at a third of its cost: %.3f rounds the same way (from the
    float's exact value), and for a duration (under ~30 years) the shortest repr of that rounded
    number is those digits without trailing zeros."""
    text = f"{seconds * 1000.0:.3f}".rstrip("0")
    return text + "0" if text[-1] == "." else text


# The fields from code to plan come from the config and the status table, so a busy gateway
# writes the same few combinations over and over: each one is encoded once. Bounded, as a
# config may hold many keys.
_LABEL_CACHE_SIZE = 4096
_label_fields: dict[tuple[str, str, str, str, str], str] = {}


def _encode_labels(labels: tuple[str, str, str, str, str]) -> str:
    code, product, route, key_name, plan = labels
    text = (
        f'"code":{_string(code)},"product":{_string(product)},"route":{_string(route)},'
        f'"key":{_string(key_name)},"plan":{_string(plan)}'
    )
    if len(_label_fields) >= _LABEL_CACHE_SIZE:
        _label_fields.clear()
    _label_fields[labels] = text
    return text


def _readable(path: str) -> str:
    """`path` with the bytes that are not UTF-8 percent-encoded again: the HTTP layer keeps them
    as lone surrogates (surrogateescape), which JSON can write but a reader of the log cannot
    decode. Rare: only for a path that is not ASCII."""
    return "".join(
        f"%{ord(char) - 0xDC00:02X}" if 0xDC80 <= ord(char) <= 0xDCFF else char for char in path
    )


def format_access_log(record: RequestRecord) -> str:
    """The JSON line for one request, without its newline."""
    path = record.path
    if "?" in path:
        # The record should never hold a query string; if one slipped in, it may hold a key.
        path = path.split("?", 1)[0]
    if not path.isascii():
        path = _readable(path)
    labels = (record.code, record.product, record.route, record.key_name, record.plan)
    label_fields = _label_fields.get(labels) or _encode_labels(labels)
    upstream = record.upstream_duration
    upstream_ms = "null" if upstream is None else milliseconds(upstream)
    # Only a WebSocket line has it: the bytes its client sent through the tunnel.
    extra = "" if record.bytes_received is None else f',"bytes_received":{record.bytes_received}'
    if record.units is not None:
        # Only on a route whose upstream reports the cost: what the request was settled at.
        extra += f',"units":{record.units}'
    # Integers without a format spec ({n}, not {n:d}): the spec is parsed anew on every line,
    # which cost ~8% of a line (bench/PROFILE.md, "Session 3"); the record's fields are ints.
    return (
        f'{{"time":"{format_time(record.start)}","request_id":{_string(record.request_id)},'
        f'"method":{_string(record.method)},"path":{_string(path)},"status":{record.status},'
        f'{label_fields},"duration_ms":{milliseconds(record.duration)},'
        f'"upstream_ms":{upstream_ms},"bytes_sent":{record.bytes_sent}{extra}}}'
    )


def write_access_log(record: RequestRecord) -> None:
    """Log the request's line: into the current batch while a worker serves, else at once."""
    if not _enabled:
        return
    line = format_access_log(record) + "\n"
    if _batch.users:  # batching (`_Batch.active`, spelled out: this runs per request)
        _batch.add(line)
    else:
        _write(line.encode())


# --- batches ------------------------------------------------------------------------------

# Up to PIPE_BUF bytes, a write(2) to a pipe is atomic: nobody else's bytes land inside it.
BATCH_BYTES = select.PIPE_BUF
FLUSH_INTERVAL = 1.0  # seconds a line may wait in a batch, at most

log = logging.getLogger("gateway.accesslog")


class _Batch:
    """The lines of this process not yet written, and the timer that writes them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.size = 0  # bytes in `lines`; a line is ASCII, so its length is its size
        self.users = 0  # workers of this process that serve (tests may run more than one)
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop that runs `timer`
        self.timer: asyncio.TimerHandle | None = None

    @property
    def active(self) -> bool:
        return self.users > 0

    def add(self, line: str) -> None:
        # Written before the line that would overflow it, so no write exceeds BATCH_BYTES
        # unless one line alone does.
        if self.size + len(line) > BATCH_BYTES:
            self.flush()
        self.lines.append(line)
        self.size += len(line)

    def flush(self) -> None:
        if not self.lines:
            return
        data = "".join(self.lines).encode()
        self.lines.clear()
        self.size = 0
        _write(data)

    def tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.flush()
        self.timer = loop.call_later(FLUSH_INTERVAL, self.tick, loop)


_batch = _Batch()


def start_batching(loop: asyncio.AbstractEventLoop) -> None:
    """Gather lines into batches from now on, written at least every second by `loop`."""
    _batch.users += 1
    if _batch.loop is not loop or _batch.timer is None:
        # A timer of another loop (one closed without stop_batching) would never run here.
        if _batch.timer is not None:
            _batch.timer.cancel()
        _batch.loop = loop
        _batch.timer = loop.call_later(FLUSH_INTERVAL, _batch.tick, loop)


def stop_batching() -> None:
    """Write the lines gathered so far; the last worker to stop turns batching off."""
    _batch.users = max(0, _batch.users - 1)
    if not _batch.active and _batch.timer is not None:
        _batch.timer.cancel()
        _batch.timer, _batch.loop = None, None
    _batch.flush()


def flush_access_log() -> None:
    """Write the lines gathered so far (at shutdown, or before a process exits abruptly)."""
    _batch.flush()


_write_failed = False


def _write(data: bytes) -> None:
    """Write `data` to stdout whole: one write(2) on the real stdout, which retries the rest
    only if the kernel takes part of it (a full non-blocking pipe, a signal)."""
    global _write_failed
    stream, real = sys.stdout, sys.__stdout__
    if stream is None:
        return
    if real is None or stream is not real:
        # Replaced (tests, embedding): it takes text.
        stream.write(data.decode())
        stream.flush()
        return
    try:
        real.flush()  # whatever else was printed goes first
        fd = real.fileno()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                # Someone made stdout non-blocking: wait for room rather than lose lines.
                select.select([], [fd], [])
    except OSError as exc:
        # The reader is gone or the disk is full: serving goes on; say so once, on stderr.
        if not _write_failed:
            _write_failed = True
            log.error("access log: cannot write to stdout, lines are lost: %s", exc)
