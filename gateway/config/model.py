"""The validated configuration: frozen, typed, built once by the loader.

Everything the request path needs is precomputed here (compiled regexes, parsed upstream
URLs, seconds as floats) so that serving a request parses nothing.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from operator import attrgetter
from typing import Any, Literal
from zoneinfo import ZoneInfo

OnError = Literal["deny", "allow", "local"]
ON_ERROR_CHOICES: tuple[OnError, ...] = ("deny", "allow", "local")
# The largest limit or cost: counts the Redis scripts keep exact (Lua numbers are doubles,
# exact to 2**53) with room for a period's sum of them; 10**12 is also the largest credit.
MAX_COUNT = 10**12

# What a plan's `quota.refund_on` may list.
RefundOutcome = Literal["5xx", "499"]
REFUND_OUTCOMES: tuple[RefundOutcome, ...] = ("5xx", "499")
QuotaPeriod = Literal["second", "minute", "hour", "day", "week", "month"]
QUOTA_PERIODS: tuple[QuotaPeriod, ...] = ("second", "minute", "hour", "day", "week", "month")
# A rate window is a fixed length, so a calendar month has no place here.
RATE_PERIOD_SECONDS: Mapping[str, float] = {
    "second": 1.0,
    "minute": 60.0,
    "hour": 3600.0,
    "day": 86400.0,
    "week": 604800.0,
}


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    client_header: float = 10.0
    client_body: float = 30.0
    keepalive: float = 75.0
    websocket_idle: float = 300.0  # a proxied WebSocket with no byte either way is closed


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """HTTPS on the proxy port: the PEM files as written (resolved against the config file's
    folder), and the server context the loader built from them, so that a worker serves exactly
    what was validated."""

    cert: str
    key: str
    context: ssl.SSLContext = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: Address = Address("0.0.0.0", 8080)
    admin_listen: Address = Address("127.0.0.1", 9090)
    workers: int = 1  # 0 was resolved to the CPU count by the loader
    timeouts: Timeouts = Timeouts()
    drain_timeout: float = 30.0
    admin_token: str | None = None  # from GATEWAY_ADMIN_TOKEN, never from the YAML
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class StorageConfig:
    url: str = "memory://"
    timeout: float = 0.25
    on_error: OnError = "deny"
    # With on_error: local, the share of each rate limit one process admits on its own.
    local_fraction: float = 0.5

    @property
    def is_memory(self) -> bool:
        return self.url.startswith("memory://")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    header: str = "X-API-Key"
    query_param: str | None = "api_key"


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str  # as written, for messages
    scheme: Literal["http", "https"]
    host: str
    port: int
    base_path: str  # no trailing slash; "" for the root
    connect_timeout: float = 2.0
    timeout: float = 30.0
    # X-Gateway-Key-Name and X-Gateway-Plan sent with each request (README, "Headers")
    identity_headers: bool = False

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Maintenance:
    retry_after: int = 600
    message: str = "The product is down for maintenance."


@dataclass(frozen=True, slots=True)
class PathParamRule:
    """A rule on a `{name}` of the path template."""

    name: str
    enum: frozenset[str] | None = None
    pattern: re.Pattern[str] | None = None  # full match; a miss is 404 Wrong identifier


_INTEGER = re.compile(r"-?[0-9]+")
# Longer integers are not converted: int() of thousands of digits costs, and Python refuses
# more than 4,300 (a query may hold 64 KiB of them).
_MAX_DIGITS = 18


@dataclass(frozen=True, slots=True)
class QueryParamRule:
    name: str
    type: Literal["int", "string"] = "string"
    min: int | None = None  # a bound on the value for int, on the length for string
    max: int | None = None
    required: bool = False
    enum: frozenset[str] | None = None
    pattern: re.Pattern[str] | None = None

    def refuses(self, value: str) -> str | None:
        """Why `value` breaks this rule (the start of a 400's detail), or None."""
        if self.type == "int":
            # int() would also take " 7", "+7" and "1_000"; an API parameter should not.
            if _INTEGER.fullmatch(value) is None:
                return f"'{value}' is not an integer"
            if len(value.lstrip("-")) > _MAX_DIGITS:
                # Compared by its sign alone: past 18 digits it is past any bound an API has.
                if value.startswith("-") and self.min is not None:
                    return f"'{value[:20]}...' is less than the minimum {self.min}"
                if not value.startswith("-") and self.max is not None:
                    return f"'{value[:20]}...' is greater than the maximum {self.max}"
            else:
                number = int(value)
                if self.min is not None and number < self.min:
                    return f"{number} is less than the minimum {self.min}"
                if self.max is not None and number > self.max:
                    return f"{number} is greater than the maximum {self.max}"
        else:
            if self.min is not None and len(value) < self.min:
                return f"'{value}' is shorter than {self.min} characters"
            if self.max is not None and len(value) > self.max:
                return f"'{value}' is longer than {self.max} characters"
        if self.enum is not None and value not in self.enum:
            return f"'{value}' is not one of {', '.join(sorted(self.enum))}"
        if self.pattern is not None and self.pattern.fullmatch(value) is None:
            return f"'{value}' does not match {self.pattern.pattern}"
        return None


@dataclass(frozen=True, slots=True)
class Gone:
    sunset: str | None = None  # already an HTTP-date, ready for the Sunset header


@dataclass(frozen=True, slots=True)
class Redirect:
    to: str  # a template; `{name}` is replaced by the matched parameter
    permanent: bool = False


@dataclass(frozen=True, slots=True)
class CostField:
    """A JSON field of an upstream's answer that reports part of what a request cost: its
    value, times `weight`, is added to the cost (README "Metering")."""

    path: tuple[str, ...]  # member names from the document's top
    weight: int = 1  # units per unit the field counts (an output token priced above an input's)


@dataclass(frozen=True, slots=True)
class Route:
    product: str
    path: str  # the template as written; also the `route` label of metrics
    methods: frozenset[str] | None = None  # None: every method
    params: Mapping[str, PathParamRule] = field(default_factory=dict)
    query: Mapping[str, QueryParamRule] = field(default_factory=dict)
    gone: Gone | None = None
    redirect: Redirect | None = None
    websocket: bool = False  # WebSocket upgrades are proxied (else answered as plain requests)
    cost: int = 1  # quota units one admitted request uses (README "Metering")
    # The upstream's answer header that states what a request cost, settled after the answer
    # (README "Metering"), lower-cased as the answer's raw lines are matched, once here rather
    # than per request; None: `cost` is the cost.
    cost_header: bytes | None = None
    # Or the JSON fields of its answer's body, or of its events' data, whose values (each
    # times its weight) add up to it (README "Metering"); a route has one or neither.
    cost_field: tuple[CostField, ...] | None = None
    line: int = 0  # where it was declared, for messages
    # Whether the upstream reports what a request cost (either of the two): a field, not a
    # property, as every request asks.
    reports_cost: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        reports = self.cost_header is not None or self.cost_field is not None
        object.__setattr__(self, "reports_cost", reports)


@dataclass(frozen=True, slots=True)
class Product:
    name: str
    upstream: Upstream
    routes: tuple[Route, ...]
    maintenance: Maintenance | None = None


@dataclass(frozen=True, slots=True)
class RateRule:
    limit: int
    window: float  # seconds of the sliding window
    per: str  # as written, for headers and the admin API


@dataclass(frozen=True, slots=True)
class QuotaRule:
    limit: int
    per: QuotaPeriod
    timezone: ZoneInfo
    refund_on: frozenset[RefundOutcome] = frozenset()  # the plan's, when it has this quota


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    rate: RateRule | None = None
    quota: QuotaRule | None = None
    # The outcomes whose units are given back (README "Metering", "Refunds"): its quota's
    # `refund_on` whenever it has a quota (set so below), else the plan's own, whose units
    # then bill through the day's history alone.
    refund_on: frozenset[RefundOutcome] = frozenset()

    def __post_init__(self) -> None:
        if self.quota is not None:
            object.__setattr__(self, "refund_on", self.quota.refund_on)

    def refunds(self, status: int, client_gone: bool) -> bool:
        """Whether a request that ended with `status` gets its units back; `client_gone`: the
        499 is the gateway's record of a client that left (an upstream's own 499 is an answer
        like any other, and the client has it whole)."""
        if 500 <= status <= 599:
            return "5xx" in self.refund_on
        return status == 499 and client_gone and "499" in self.refund_on


@dataclass(frozen=True, slots=True)
class PlanOverride:
    """A key's own limits on one product, in place of its plan's (README "Metering")."""

    rate: RateRule | None = None  # None: the plan's rate
    quota: QuotaRule | None = None  # None: the plan's quota
    # An override's quota that does not list refund_on keeps the plan's.
    quota_refund_on_given: bool = False

    def apply(self, plan: Plan) -> Plan:
        """`plan` with this key's limits; it keeps the plan's name."""
        rate = self.rate if self.rate is not None else plan.rate
        quota = self.quota
        if quota is None:
            return Plan(plan.name, rate, plan.quota, plan.refund_on)
        if not self.quota_refund_on_given:
            quota = replace(quota, refund_on=plan.refund_on)
        return Plan(plan.name, rate, quota)


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    key_sha256: str  # lower-case hex; the plaintext is never kept
    plans: Mapping[str, str]  # product -> plan name
    disabled: bool = False
    expires: float | None = None  # unix time from which the key is refused (401)
    # product -> this key's own limits on it; the plan's name stays plans[product]
    overrides: Mapping[str, PlanOverride] = field(default_factory=dict)

    def plan_for(self, product: str, plans: Mapping[str, Plan]) -> Plan | None:
        """The plan this key has on `product`, with its overrides applied; None if none (or if
        `plans` does not declare it)."""
        name = self.plans.get(product)
        if name is None:
            return None
        plan = plans.get(name)
        if plan is None:  # an API key whose plan a later config no longer declares
            return None
        override = self.overrides.get(product)
        return plan if override is None else override.apply(plan)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its fields in order: a slotted dataclass's own pickling calls
        # `dataclasses.fields()` for every object, and a config of 100,000 keys is pickled by the
        # process that read it and unpickled by the one that serves it (measured: 0.8 s to
        # pickle and 0.55 s to unpickle 100,000 keys, 0.33 s and 0.2 s like this).
        return ApiKey, _api_key_fields(self)


_api_key_fields = attrgetter(*(f.name for f in fields(ApiKey)))


def not_in_config(
    plan_names: Mapping[str, str], products: Collection[str], plans: Collection[str]
) -> dict[str, str]:
    """product -> "product" or "plan": the entries of a key's plans (product -> plan name)
    whose product, else whose plan, the config does not declare. Only an API key has any: a
    reload may take out what the storage's keys name, a file key's would be a config error."""
    missing: dict[str, str] = {}
    for product, plan in plan_names.items():
        if product not in products:
            missing[product] = "product"
        elif plan not in plans:
            missing[product] = "plan"
    return missing


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    storage: StorageConfig
    auth: AuthConfig
    products: Mapping[str, Product]
    plans: Mapping[str, Plan]
    keys: tuple[ApiKey, ...]
    sources: tuple[str, ...] = ()  # the files it was read from, for reload

    def key_by_name(self, name: str) -> ApiKey | None:
        for key in self.keys:
            if key.name == name:
                return key
        return None
