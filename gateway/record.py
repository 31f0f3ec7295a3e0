"""What is known about one request once it is answered (fed to the metrics and the access
log), and where request ids come from."""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str  # without the query string, so no key can leak through it
    start: float  # time.time() when the request head was read
    status: int = 0
    code: str = ""  # the status code table's, "upstream" if proxied, "client_closed" for 499
    product: str = ""  # "" when no route matched
    route: str = ""  # the route's template, "" when no route matched
    key_name: str = ""
    plan: str = ""
    duration: float = 0.0  # seconds from head to the last byte sent
    upstream_duration: float | None = None  # seconds from sending upstream to its response head
    bytes_sent: int = 0
    bytes_received: int | None = None  # through a WebSocket, from the client; else None
    # On a route whose upstream reports the cost: the quota units the request was settled at.
    units: int | None = None


class _RequestIds:
    """Unique ids (32 hex digits) without a system call each, as os.urandom per request would
    make: a random prefix per process, drawn again in a forked child, and a counter."""

    def __init__(self) -> None:
        self._draw()
        os.register_at_fork(after_in_child=self._draw)

    def _draw(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


new_request_id = _RequestIds()
"""A new request id: the one generator for the proxy port, its protocol errors and the admin."""


# A client's own request id is kept only when it cannot upset a log line or a header.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id_for(given: str | None) -> str:
    """The id of a request that sent `given` as its X-Request-ID: that, if it is sane, or a
    new one."""
    if given and _SANE_REQUEST_ID.fullmatch(given):
        return given
    return new_request_id()
