"""Load for the accuracy tests: many concurrent clients, and an upstream that times arrivals.

The upstream runs in its own process so that its arrival times are not delayed by the load
generator sharing its event loop; it stamps every request with time.time() the moment its
handler runs, together with the X-Request-ID the gateway forwarded. The load generator stamps
each request it sends with its own id and time.time(). Both read the system-wide
CLOCK_REALTIME, the clock Redis's TIME reads for the limiter's window: the limits are exact on
that clock, and a bound taken on another one (CLOCK_MONOTONIC, which a step of the real-time
clock does not move) can come out shorter than the window by the step. A run on a busy host
once found 11 admissions within 0.9975 s of CLOCK_MONOTONIC, in two tests a few seconds apart.

    python -m tests.support.load --port PORT     serve the timed upstream on 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tests.support.paths import REPO_ROOT
from tests.support.sockets import free_port

# Not under the gateway's upstream prefix, so no proxied request can reach it.
ARRIVALS_PATH = "/_arrivals"


# --- the timed upstream ---------------------------------------------------------------


def _timed_upstream_app() -> web.Application:
    arrivals: list[tuple[float, str]] = []

    async def record(request: web.Request) -> web.Response:
        arrivals.append((time.time(), request.headers.get("X-Request-ID", "")))
        return web.json_response({"ok": True})

    async def report(request: web.Request) -> web.Response:
        return web.json_response(arrivals)

    async def forget(request: web.Request) -> web.Response:
        arrivals.clear()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get(ARRIVALS_PATH, report)
    app.router.add_delete(ARRIVALS_PATH, forget)
    app.router.add_route("*", "/{tail:.*}", record)
    return app


@dataclass(frozen=True, slots=True, order=True)
class Arrival:
    time: float  # time.time() in the upstream's process (module docstring: why that clock)
    request_id: str


class TimedUpstream:
    """A real upstream in a child process; `arrivals()` are the requests it saw, in order."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        command = [sys.executable, "-m", "tests.support.load", "--port", str(self.port)]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the timed upstream exited with {self.process.returncode}")
            try:
                self.arrivals()
            except OSError:
                time.sleep(0.05)
                continue
            return
        raise RuntimeError(f"the timed upstream did not start in {timeout}s")

    def arrivals(self) -> list[Arrival]:
        with urllib.request.urlopen(self.url + ARRIVALS_PATH, timeout=5) as response:
            seen = json.loads(response.read())
        return sorted(Arrival(float(moment), str(request_id)) for moment, request_id in seen)

    def forget(self) -> None:
        request = urllib.request.Request(self.url + ARRIVALS_PATH, method="DELETE")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


# --- the load generator ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadAnswer:
    """What the load generator keeps of one answer."""

    status: int
    code: str | None  # the problem's `code` for the gateway's own answers, else None
    retry_after: str | None
    request_id: str
    sent: float  # time.time() just before the request was sent (as Arrival.time)


@dataclass
class LoadResult:
    duration: float
    answers: list[LoadAnswer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # transport failures, should stay empty

    @property
    def admitted(self) -> int:
        return sum(1 for answer in self.answers if answer.status == 200)

    def sent_at(self) -> dict[str, float]:
        return {answer.request_id: answer.sent for answer in self.answers}

    @property
    def offered_per_second(self) -> float:
        return len(self.answers) / self.duration

    def rejected(self) -> list[LoadAnswer]:
        return [answer for answer in self.answers if answer.status != 200]


async def run_load(
    urls: Sequence[str], headers: Mapping[str, str], *, clients: int, duration: float
) -> LoadResult:
    """`clients` connections, client i on urls[i % len(urls)], each looping for `duration`.

    Every client sends at least one request, so `duration=0` is one request per client.
    """
    result = LoadResult(duration)
    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=10)

    async def client(
        session: aiohttp.ClientSession, number: int, url: str, deadline: float
    ) -> None:
        sequence = 0
        while True:
            sequence += 1
            request_id = f"load-{number}-{sequence}"
            sent = time.time()
            try:
                async with session.get(
                    url, headers={**headers, "X-Request-ID": request_id}
                ) as response:
                    body = await response.read()
                    code = None
                    if response.headers.get("Content-Type") == "application/problem+json":
                        code = json.loads(body)["code"]
                    answer = LoadAnswer(
                        response.status,
                        code,
                        response.headers.get("Retry-After"),
                        request_id,
                        sent,
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.errors.append(repr(exc))
            else:
                result.answers.append(answer)
            if time.monotonic() >= deadline:
                return

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        deadline = started + duration
        await asyncio.gather(
            *(client(session, i, urls[i % len(urls)], deadline) for i in range(clients))
        )
        result.duration = time.monotonic() - started
    return result


# --- what the arrivals say ------------------------------------------------------------


def max_in_window(times: Sequence[float], window: float) -> int:
    """The most arrivals inside any half-open window [t, t + window) of the sorted `times`."""
    best = 0
    first = 0
    for last, moment in enumerate(times):
        while moment - times[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def min_span(times: Sequence[float], count: int) -> float:
    """The shortest time covered by `count` consecutive sorted arrivals (inf if fewer)."""
    spans = [times[i + count - 1] - times[i] for i in range(len(times) - count + 1)]
    return min(spans, default=float("inf"))


def tightest_admission_span_bound(
    arrivals: Sequence[Arrival], sent_at: Mapping[str, float], count: int
) -> float:
    """The least, over every `count` consecutive arrivals, of the longest time their admissions
    can have taken: each was admitted after it was sent and before it arrived, so they lay
    within [earliest send, last arrival]. Below the rate window, this proves that `count`
    admissions fell inside one window. (inf with fewer than `count` arrivals.)"""
    bounds = []
    for first in range(len(arrivals) - count + 1):
        group = arrivals[first : first + count]
        earliest_send = min(sent_at[arrival.request_id] for arrival in group)
        bounds.append(group[-1].time - earliest_send)
    return min(bounds, default=float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(description="a timed upstream for the accuracy tests")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        _timed_upstream_app(), host="127.0.0.1", port=args.port, access_log=None, print=None
    )


if __name__ == "__main__":
    main()
