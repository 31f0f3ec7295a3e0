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
"""

from __future__ import annotations

import json
import os
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
# cheaper than strftime per request.
_cached_second = -1
_cached_prefix = ""


def format_time(unix_time: float) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. 2025-05-01T12:00:00.123Z."""
    global _cached_second, _cached_prefix
    # Scaling first keeps e.g. .3 from becoming 299 ms through the float's representation error.
    second, millis = divmod(int(unix_time * 1000), 1000)
    if second != _cached_second:
        _cached_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _cached_second = second
    return f"{_cached_prefix}.{millis:03d}Z"


# The C string encoder json.dumps itself uses (ASCII-only output); building the object's text
# around it skips the dict and the generic encoder, the bulk of a line's cost.
_string = json.encoder.encode_basestring_ascii


def format_access_log(record: RequestRecord) -> str:
    """The JSON line for one request, without its newline."""
    path = record.path
    if "?" in path:
        # The record should never hold a query string; if one slipped in, it may hold a key.
        path = path.split("?", 1)[0]
    upstream = record.upstream_duration
    upstream_ms = "null" if upstream is None else repr(round(upstream * 1000.0, 3))
    # Only a WebSocket line has it: the bytes its client sent through the tunnel.
    received = (
        "" if record.bytes_received is None else f',"bytes_received":{record.bytes_received:d}'
    )
    return (
        f'{{"time":"{format_time(record.start)}","request_id":{_string(record.request_id)},'
        f'"method":{_string(record.method)},"path":{_string(path)},"status":{record.status:d},'
        f'"code":{_string(record.code)},"product":{_string(record.product)},'
        f'"route":{_string(record.route)},"key":{_string(record.key_name)},'
        f'"plan":{_string(record.plan)},"duration_ms":{round(record.duration * 1000.0, 3)!r},'
        f'"upstream_ms":{upstream_ms},"bytes_sent":{record.bytes_sent:d}{received}}}'
    )


def write_access_log(record: RequestRecord) -> None:
    """Write the request's line to stdout and flush it, so lines are never held back or split."""
    if not _enabled:
        return
    # Looked up on each call so that a replaced sys.stdout (tests, embedding) is honoured.
    stream = sys.stdout
    stream.write(format_access_log(record) + "\n")
    stream.flush()
