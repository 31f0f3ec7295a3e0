"""What is known about one request once it is answered: fed to the metrics and the access log."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str  # without the query string, so no key can leak through it
    start: float  # time.time() when the request head was read
    status: int = 0
    code: str = ""  # the §4 code, "upstream" for a proxied answer, "client_closed" for 499
    product: str = ""  # "" when no route matched
    route: str = ""  # the route's template, "" when no route matched
    key_name: str = ""
    plan: str = ""
    limit_outcome: str = ""  # allowed | throttled | quota_exceeded | storage_error | ""
    duration: float = 0.0  # seconds from head to the last byte sent
    upstream_duration: float | None = None  # seconds from sending upstream to its response head
    bytes_sent: int = 0
