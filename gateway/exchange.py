"""One request on its way through the request path (`gateway.pipeline`): what the steps learn
about it, in the order they learn it, and what its record says for the metrics and the access
log; and what it leaves to settle once it is answered (a refund, or the cost its upstream
reported).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from gateway import metrics
from gateway.config.model import MAX_COUNT, ApiKey
from gateway.http.headers import ExtraHeaders
from gateway.http.request import Request
from gateway.keys.index import Principal
from gateway.limits.base import Decision, Receipt
from gateway.limits.headers import LIMIT_HEADER_NAMES, header_dict, limit_header_lines
from gateway.problems import CLIENT_CLOSED_CODE, REQUEST_ID_HEADER
from gateway.record import RequestRecord, new_request_id, request_id_for
from gateway.routing import RouteMatch

if TYPE_CHECKING:
    from gateway.runtime import Runtime, Snapshot

# The headers that are the gateway's to say: an upstream's lines of these names never reach the
# client (the gateway's replace them in the final answer; an interim answer loses them).
GATEWAY_OWNED_HEADERS = (REQUEST_ID_HEADER, *LIMIT_HEADER_NAMES)
_MAX_COUNT_DIGITS = len(str(MAX_COUNT))

log = logging.getLogger("gateway")


class Exchange(RequestRecord):
    """What the steps learn about one request, in the order they learn it. It is the
    request's record too (what metrics and the access log read): one object per request."""

    __slots__ = (
        "began",
        "counted",
        "decision",
        "key",
        "limit_lines",
        "match",
        "principal",
        "receipt",
        "reported",
        "request",
        "runtime",
        "snapshot",
        "started",
    )

    def __init__(self, request: Request, runtime: Runtime) -> None:
        request_id = _request_id(request)
        RequestRecord.__init__(self, request_id, request.method, request.path, time.time())
        self.started = time.perf_counter()
        self.counted = False
        self.request = request
        self.runtime = runtime
        self.snapshot: Snapshot = runtime.snapshot  # one config for the whole request
        # An admission's limit headers, as header lines, and its decision (`admit`).
        self.limit_lines = ""
        self.decision: Decision | None = None
        self.match: RouteMatch | None = None
        self.key: ApiKey | None = None
        self.principal: Principal | None = None
        self.receipt: Receipt | None = None  # an admission whose units may come back
        # The status of an answer whose head reached the client before it left (cut_by_client).
        self.began: int | None = None
        # The cost the upstream reported (the route's cost_header or cost_field), once said.
        self.reported: int | None = None

    def count(self) -> None:
        """Count the request in the metrics, once, before the answer is complete: a scrape
        that starts after the client has its answer (on any worker) must see it."""
        if not self.counted:
            self.counted = True
            self.duration = time.perf_counter() - self.started
            metrics.observe_request(self)

    def admit(self, decision: Decision) -> None:
        """Keep the limit headers of an admission for the answer: rendered as lines at once
        (what a proxied answer carries), a dict of them only if the gateway ends up answering
        itself (`own_headers`)."""
        self.limit_lines = limit_header_lines(decision)
        self.decision = decision

    def decided_after_leaving(self, decision: Decision) -> None:
        """What the storage decided for this request after its client left, while the check
        was on its way: counted as any decision, and what it took settled as the 499 it is
        (given back under `refund_on: [499]`)."""
        self.count_decision(decision)
        if decision.receipt is not None:  # an admission whose units may come back
            self.settle(decision.receipt)

    def count_decision(self, decision: Decision) -> None:
        """The storage's decision in the metrics: the limits' verdict (a plan without limits
        has none: its requests count in the history only) and an admission's units."""
        assert self.principal is not None and self.match is not None
        plan = self.principal.plan
        if plan.rate is not None or plan.quota is not None:
            metrics.observe_limit_decision(self.product, plan.name, decision.outcome)
        if decision.outcome == "allowed":
            metrics.observe_units(self.product, plan.name, self.match.route.cost)

    def own_headers(self) -> dict[str, str]:
        """The gateway's headers for an answer of its own: X-Request-ID, and the limit headers
        of a request the limits admitted (README, "Headers")."""
        return {REQUEST_ID_HEADER: self.request_id, **header_dict(self.limit_lines)}

    def upstream_answer_headers(self) -> ExtraHeaders:
        """The gateway's headers for the upstream's answer: the same, as lines. They replace
        the upstream's lines of every limit header name, whatever this plan limits: the
        upstream's own limits are not the client's (README, "Headers")."""
        return ExtraHeaders(
            GATEWAY_OWNED_HEADERS,
            # ASCII: a request id is the client's only if it is sane (_request_id).
            f"{REQUEST_ID_HEADER}: {self.request_id}\r\n{self.limit_lines}".encode(),
        )

    def answered_by_upstream(self, status: int, upstream_seconds: float, bytes_sent: int) -> None:
        self.status, self.code = status, "upstream"
        self.upstream_duration = upstream_seconds
        self.bytes_sent = bytes_sent
        # Should the client vanish during the last write, the log says 499 and the metrics
        # keep this 200: the answer was complete as far as the gateway could tell.
        self.count()

    def cut_by_client(self, upstream_seconds: float, bytes_sent: int, began: int | None) -> None:
        # A 499 (handle_request says so) that had its upstream's answer under way.
        self.upstream_duration = upstream_seconds
        self.bytes_sent = bytes_sent
        self.began = began

    def report_cost(
        self, value: bytes | None, status: int | None, cut: bool = False
    ) -> ExtraHeaders | None:
        """What the upstream's answer said this request cost (the route's cost_header, in its
        head or its trailer, or cost_field, in its body): a whole number from 0 to the largest
        count, or the route's `cost` stands (README, "Metering"). Several values,
        comma-separated, are one cost when they say the same number (`3, 3`; `3, 03`). With
        the answer's `status` (its head still to be sent), answers the gateway's header lines
        for it when the quota's remaining units, as settled at that cost, differ from what the
        admission left; `status` is None for a report after the head (a trailer, a body).
        `cut`: the answer broke off before the end that would have said it."""
        assert self.match is not None
        if value is None:
            metrics.count_cost_report(self.product, self.route, "cut" if cut else "missing")
            return None
        if b"," in value:
            numbers = {_whole_number(part.strip()) for part in value.split(b",")}
            reported = numbers.pop() if len(numbers) == 1 else None
        else:
            reported = _whole_number(value)
        if reported is not None:
            self.reported = reported
            metrics.count_cost_report(self.product, self.route, "ok")
            return None if status is None else self._settled_headers(reported, status)
        # The id in the text: the log's format has no field for `extra`, and a disputed
        # call is looked up by it (README, "Metering").
        log.warning(
            "the upstream of %s reported a cost of %r on %s, not a whole number from 0 to "
            "%d: the route's cost of %d stands (request %s)",
            self.product,
            value.decode("latin-1")[:40],
            self.route,
            MAX_COUNT,
            self.match.route.cost,
            self.request_id,
        )
        metrics.count_cost_report(self.product, self.route, "invalid")
        return None

    def _settled_headers(self, reported: int, status: int) -> ExtraHeaders | None:
        """The answer's headers with the quota's remaining units as the admission left them,
        give or take what settling at `reported` moves. An answer whose status the plan
        refunds keeps the admission's, as on every route (its hold comes back whole)."""
        decision, match, principal = self.decision, self.match, self.principal
        if decision is None or decision.quota is None or match is None or principal is None:
            return None
        plan = principal.plan
        if plan.refund_on and plan.refunds(status, False):
            return None
        held = match.route.cost
        if reported == held:
            return None
        quota = decision.quota
        # At admission the hold fitted: `remaining` was the limit less the units used, exact.
        remaining = max(0, min(quota.limit, quota.remaining + held - reported))
        self.limit_lines = limit_header_lines(
            decision._replace(quota=quota._replace(remaining=remaining))
        )
        return self.upstream_answer_headers()

    def settle(self, receipt: Receipt) -> None:
        """9: give the units back when the plan's refund_on lists the outcome, else settle the
        cost the upstream reported (README, "Metering"); in a task of its own, as a cancelled
        request cannot wait for it."""
        assert self.principal is not None and self.match is not None
        plan = self.principal.plan
        runtime = self.runtime
        reported = self.reported
        settled_at = receipt.cost if reported is None else reported
        if plan.refund_on:
            gone = self.code == CLIENT_CLOSED_CODE
            # An answer cut short after its head was sent counts by the status it began with
            # (README, "Metering"), a cut of its client's too: a 503 whose client left before
            # its body was all there is still a 5xx under refund_on: [5xx].
            began = self.began if gone else None
            if plan.refunds(self.status, gone) or (
                began is not None and plan.refunds(began, False)
            ):
                settled_at = 0  # whatever the upstream reported
        if self.match.route.reports_cost:
            self.units = settled_at  # the access log's record of it
        if settled_at != receipt.cost:
            runtime.settlements.start(
                runtime.limiter,
                self.principal.subject,
                receipt,
                self.product,
                self.snapshot.config.storage.timeout,
                settled_at - receipt.cost,
                self.request_id,
            )


def _whole_number(text: bytes) -> int | None:
    """`text` as a count from 0 to MAX_COUNT, ASCII digits only; None for anything else."""
    if len(text) > _MAX_COUNT_DIGITS:
        # Leading zeros say the same number (`007` is 7); only they can make so long a value
        # one, so they are stripped here, off the common path.
        text = text.lstrip(b"0") or b"0"
    # bytes.isdigit is ASCII digits only; the length bound keeps int() cheap.
    if not text.isdigit() or len(text) > _MAX_COUNT_DIGITS:
        return None
    number = int(text)
    return number if number <= MAX_COUNT else None


def _request_id(request: Request) -> str:
    raw = request.request_id_header
    return request_id_for(raw.decode("latin-1")) if raw else new_request_id()
