"""What bench/run.py measured, and how it is written to RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

from harness import GATEWAY_CHECKOUT
from peers import ENVOY as ENVOY_NAME
from peers import ENVOY_LOGGED
from rss_stream import RssResult
from rss_stream import report_lines as rss_lines

DIRECT, NGINX = "direct (upstream nginx)", "nginx proxy_pass"
GW_SHIPPED = "gateway, redis, access log to a pipe (shipped defaults)"
GW_REDIS, GW_MEMORY = "gateway, redis, access log off", "gateway, memory, access log off"
# The shipped defaults again, under the interpreter running the bench when it is not the one
# the gateway rows run under (interpreter.py): what a slower CPython build costs.
GW_OWN_PYTHON = "gateway, shipped defaults, under the bench's own Python"


@dataclass(frozen=True)
class WrkRun:
    requests: int
    rps: float
    bad_responses: int  # non-2xx plus socket errors
    cpu_us: float | None = None  # CPU time of the target's processes per request counted


@dataclass
class TargetResult:
    name: str
    runs: list[WrkRun] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(run.rps for run in self.runs)

    @property
    def low(self) -> float:
        return min(run.rps for run in self.runs)

    @property
    def high(self) -> float:
        return max(run.rps for run in self.runs)

    @property
    def bad_responses(self) -> int:
        return sum(run.bad_responses for run in self.runs)

    @property
    def cpu_us(self) -> float | None:
        """The median of the rounds' CPU µs per request."""
        found = [run.cpu_us for run in self.runs if run.cpu_us is not None]
        return statistics.median(found) if found else None


@dataclass(frozen=True)
class CoreLoad:
    """What core 1 (wrk, the upstream, Redis, the log's reader) spent during one measured run
    of a target on core 0: its processes' CPU time and the core's busy time from /proc/stat
    (the kernel's share for loopback traffic included), in seconds, for `requests`."""

    requests: int
    busy: float
    wrk: float
    upstream: float
    redis: float
    reader: float

    def per_request(self, seconds: float) -> float:
        return seconds * 1e6 / max(self.requests, 1)

    @property
    def ceiling(self) -> float:
        """Requests a second core 1 could carry at this cost per request, were it all theirs."""
        return self.requests / self.busy if self.busy > 0 else float("inf")


def median_core_load(runs: list[CoreLoad]) -> CoreLoad:
    """The run of median busy time per request: one real run, its parts adding up."""
    ordered = sorted(runs, key=lambda run: run.busy / max(run.requests, 1))
    return ordered[len(ordered) // 2]


@dataclass
class AccessLogCheck:
    """Lines the shipped gateways of the throughput rounds wrote to their stdout pipe, against
    the requests they answered: at least those counted (start-up checks and wrk's), at most as
    many more as wrk may have left in flight when it stopped."""

    lines: int = 0
    counted: int = 0
    cut_off_at_most: int = 0
    broken: int = 0  # lines of any shipped gateway's log that are not one whole JSON object

    @property
    def complete(self) -> bool:
        whole = self.broken == 0
        return whole and self.counted <= self.lines <= self.counted + self.cut_off_at_most


@dataclass(frozen=True)
class Latency:
    name: str
    offered_rps: float
    achieved_rps: float
    p50_ms: float
    p99_ms: float
    not_ok: int  # answered with another status than 200, or failed
    in_bursts: float  # the share of requests sent in bursts (run.burst_share)


def median_latency(rounds: list[Latency]) -> Latency:
    """One target's rounds as one row: the median of each figure, the failures summed."""
    return Latency(
        name=rounds[0].name,
        offered_rps=rounds[0].offered_rps,
        achieved_rps=statistics.median(r.achieved_rps for r in rounds),
        p50_ms=statistics.median(r.p50_ms for r in rounds),
        p99_ms=statistics.median(r.p99_ms for r in rounds),
        not_ok=sum(r.not_ok for r in rounds),
        in_bursts=statistics.median(r.in_bursts for r in rounds),
    )


@dataclass
class RedisUsage:
    calls: Counter[str] = field(default_factory=Counter)  # INFO commandstats over the wrk runs
    usec: Counter[str] = field(default_factory=Counter)  # Redis's time in them, µs
    requests: int = 0  # what wrk counted in those runs
    sample_requests: int = 0  # sequential requests watched with MONITOR
    sample_client: Counter[str] = field(default_factory=Counter)  # sent by the gateway
    sample_script: Counter[str] = field(default_factory=Counter)  # run inside Lua scripts

    def per_request(self, calls: int) -> float:
        return calls / max(self.requests, 1)

    @property
    def round_trips(self) -> float:
        """Commands the gateway sent per request: an upper bound of its round trips."""
        return sum(self.sample_client.values()) / max(self.sample_requests, 1)


@dataclass
class Report:
    started: datetime
    load_at_start: str
    stolen: str  # the CPU time the hypervisor took from the machine during the run
    command_line: str
    rounds: int
    duration: int
    connections: int
    throughput: dict[str, TargetResult]
    redis: RedisUsage
    latency_rounds: list[list[Latency]]  # per round: direct first, the gateway last
    rss: RssResult | None
    commands: dict[str, str]
    peer_versions: dict[str, str] = field(default_factory=dict)  # peer -> "envoy 1.40.0"
    missing_peers: dict[str, str] = field(default_factory=dict)  # peer -> why it did not run
    access_log: AccessLogCheck = field(default_factory=AccessLogCheck)
    gateway_python: str = ""  # the interpreter the gateway rows ran under, described
    own_python: str = ""  # the bench's own, when the GW_OWN_PYTHON row ran
    neighbour_cpu: float = 0.0  # CPU s of the idle core-0 proxies during measurements
    neighbour_wall: float = 0.0  # s of those measurements
    envoy_log_lines: int | None = None  # what the Envoy row with an access log wrote
    core_loads: dict[str, list[CoreLoad]] = field(default_factory=dict)  # target -> its runs

    @property
    def latency(self) -> list[Latency]:
        """Per target, the medians over the rounds (direct first, the gateway last)."""
        return [median_latency(list(rows)) for rows in zip(*self.latency_rounds, strict=True)]

    @property
    def added_p99s(self) -> list[float]:
        """The p99 the gateway added in each round: its p99 less the upstream's, direct."""
        return [rows[-1].p99_ms - rows[0].p99_ms for rows in self.latency_rounds]

    @property
    def added_p99(self) -> float:
        """The median of `added_p99s`: what the target is judged on."""
        return statistics.median(self.added_p99s)

    @property
    def peers(self) -> list[str]:
        """The peers that ran, in the table's order."""
        return [name for name in self.throughput if name in self.peer_versions]


def tool_version(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    found = re.search(r"\d+\.\d+(\.\d+)?", done.stdout + done.stderr)
    return f"{argv[0]} {found.group() if found else '(unknown version)'}"


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    models = [
        line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line
    ]
    model = models[0] if models else "unknown CPU"
    return f"{os.cpu_count()} CPUs (nproc), {model}, Linux {platform.release()}"


def versions(peers: dict[str, str]) -> str:
    tools = [["nginx", "-v"], ["redis-server", "--version"], ["wrk", "-v"], ["h2load", "--version"]]
    python = f"Python {platform.python_version()}, aiohttp {version('aiohttp')}"
    return "; ".join([python, *(tool_version(argv) for argv in tools), *peers.values()])


def verdicts(report: Report) -> list[str]:
    def line(ok: bool, text: str) -> str:
        return f"- {'PASS' if ok else 'FAIL'}: {text}"

    nginx, shipped, log_off, memory = (
        report.throughput[n].median for n in (NGINX, GW_SHIPPED, GW_REDIS, GW_MEMORY)
    )
    trips = report.redis.round_trips
    lines = [
        line(shipped >= 0.35 * nginx, f"shipped defaults (Redis, access log on) >= 0.35 of nginx "
             f"proxy_pass: {shipped / nginx:.2f}"),
    ]  # fmt: skip
    if ENVOY_NAME in report.throughput:
        envoy = report.throughput[ENVOY_NAME].median
        lines.append(line(shipped > envoy, f"shipped defaults ahead of Envoy's local rate "
                          f"limiter: {shipped / envoy:.2f} of it"))  # fmt: skip
    else:
        lines.append("- NOT RUN: shipped defaults ahead of Envoy's local rate limiter (no Envoy)")
    if ENVOY_LOGGED in report.throughput:
        # Not a target: the same comparison with an access log on both sides.
        logged = report.throughput[ENVOY_LOGGED].median
        lines.append(f"- INFO: like for like, shipped defaults against Envoy with a JSON access "
                     f"log to a pipe: {shipped / logged:.2f} of it")  # fmt: skip
    lines += core_verdicts(report)
    lines += [
        line(log_off >= 0.45 * nginx, f"access log off (Redis) >= 0.45 of nginx proxy_pass: "
             f"{log_off / nginx:.2f}"),
        line(log_off >= 0.90 * memory,
             f"Redis storage within 10% of memory (access log off): {log_off / memory:.2f}"),
        line(round(trips, 2) <= 1.0, f"at most one Redis round trip per admitted request: "
             f"{trips:.3f} commands sent per request"),
    ]  # fmt: skip
    if report.latency_rounds:
        rounds = ", ".join(f"{added:.2f}" for added in report.added_p99s)
        added = report.added_p99
        lines.append(line(added <= 2.0, f"added p99 at half load <= 2 ms: {added:.2f} ms "
                          f"(median of the rounds: {rounds})"))  # fmt: skip
    checked = report.access_log
    if checked.counted:
        text = (
            f"no access log line lost or split: {checked.lines:,} lines for {checked.counted:,} "
            f"requests counted plus at most {checked.cut_off_at_most:,} cut off by wrk's stop; "
            f"{checked.broken} not one whole JSON object"
        )
        lines.append(line(checked.complete, text))
    if report.rss is not None:
        growth = report.rss.growth_mb
        text = f"RSS growth while proxying {report.rss.size_mb} MiB < 32 MiB: {growth:.1f} MiB"
        lines.append(line(growth < 32, text))
    return lines


def core_verdicts(report: Report) -> list[str]:
    """What core 1's load allows any gateway in this layout, beside the ratio targets: at
    the cost per request measured in the gateway's runs, and at the least it could be, with
    wrk, the upstream and their kernel work as cheap per request as in nginx's run (where
    the rate is highest and each wake-up serves the most requests) plus Redis and the log's
    reader as measured."""
    nginx = report.throughput[NGINX].median
    nginx_runs = report.core_loads.get(NGINX)
    out = []
    for name, target in ((GW_SHIPPED, 0.35), (GW_REDIS, 0.45)):
        runs = report.core_loads.get(name)
        if not runs or not nginx_runs:
            continue
        load = median_core_load(runs)
        cheapest = median_core_load(nginx_runs)
        least_us = cheapest.per_request(cheapest.busy) + load.per_request(load.redis + load.reader)
        least_cap = 1e6 / least_us
        verdict = "above" if least_cap >= target * nginx else "BELOW"
        out.append(
            f"- INFO: core 1 (wrk, the upstream, Redis, the log's reader, their kernel work) caps "
            f"{name} at about {load.ceiling:,.0f} req/s ({load.ceiling / nginx:.2f} of nginx) at "
            f"this run's cost per request, and at {least_cap:,.0f} ({least_cap / nginx:.2f}) at "
            f"the least it could cost ({least_us:.1f} µs): {verdict} the {target:.2f} target, "
            "whatever the gateway spends on core 0"
        )
    return out


def core_section(report: Report) -> list[str]:
    """Core 1's side of the gateway's runs: what its processes spent per request."""
    if not report.core_loads:
        return []
    nginx = report.throughput[NGINX].median
    out = [
        "## What core 1 carries",
        "",
        "Each measured run of these targets also read the CPU time of core 1's processes and "
        "the core's busy time (`/proc/stat`, the kernel's work for loopback traffic included), "
        "per request wrk counted; the round with the median busy time is shown. A target on "
        "core 0 can go no faster than core 1 serves it: the last columns are the rate at which "
        "core 1 would be busy all the time at this cost per request (an estimate: wrk's and "
        "the upstream's cost per request falls a little as batches grow; Redis's script time "
        "does not).",
        "",
        "| target | wrk µs | upstream µs | Redis µs | log reader µs | core 1 busy µs "
        "| core 1 caps at req/s | to nginx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in report.core_loads.items():
        load = median_core_load(runs)
        us = load.per_request
        out.append(
            f"| {name} | {us(load.wrk):.1f} | {us(load.upstream):.1f} | {us(load.redis):.1f} "
            f"| {us(load.reader):.1f} | {us(load.busy):.1f} | {load.ceiling:,.0f} "
            f"| {load.ceiling / nginx:.2f} |"
        )
    return out


def _short(peer: str) -> str:
    return peer.split(",")[0]


def throughput_section(report: Report) -> list[str]:
    """req/s, CPU per request, and each target's ratio to nginx and to every peer that ran."""
    nginx = report.throughput[NGINX].median
    peers = report.peers
    peer_heads = "".join(f" to {_short(peer)} |" for peer in peers)
    out = [
        "## Throughput",
        "",
        "CPU µs/request: user + system CPU time of the target's own processes (the gateway "
        "process; nginx's master and worker; Envoy's and Traefik's threads) over the measured "
        "run, divided by the requests wrk counted; median of the rounds. It is steadier than "
        "req/s when other work shares the machine.",
        "",
        f"| target | req/s median | min | max | CPU µs/request | to nginx |{peer_heads}",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(peers),
    ]
    for name, result in report.throughput.items():
        flag = f" ({result.bad_responses} bad responses)" if result.bad_responses else ""
        cpu = "" if result.cpu_us is None else f"{result.cpu_us:.1f}"
        ratios = "".join(f" {result.median / report.throughput[p].median:.2f} |" for p in peers)
        bold = "**" if name == GW_SHIPPED else ""
        out.append(
            f"| {bold}{name}{bold}{flag} | {result.median:,.0f} | {result.low:,.0f} "
            f"| {result.high:,.0f} | {cpu} | {result.median / nginx:.2f} |{ratios}"
        )
    shipped, log_off, memory = (report.throughput[n] for n in (GW_SHIPPED, GW_REDIS, GW_MEMORY))
    summary = [
        f"Shipped defaults (Redis, access log on, stdout a pipe read by `cat` on core 1): "
        f"{shipped.median / nginx:.2f} of nginx"
        + "".join(f", {shipped.median / report.throughput[p].median:.2f} of {_short(p)}"
                  for p in peers)
        + f"; access log off: {log_off.median / nginx:.2f} of nginx; Redis/memory storage "
        f"(access log off) {log_off.median / memory.median:.2f}; access log on/off "
        f"{shipped.median / log_off.median:.2f}.",
    ]  # fmt: skip
    if shipped.cpu_us is not None and log_off.cpu_us is not None:
        summary.append(
            f"Gateway CPU per request: {shipped.cpu_us:.1f} µs shipped, {log_off.cpu_us:.1f} µs "
            f"with the access log off (the log costs {shipped.cpu_us - log_off.cpu_us:.1f} µs)."
        )
    envoy, logged = (report.throughput.get(n) for n in (ENVOY_NAME, ENVOY_LOGGED))
    if envoy and logged and envoy.cpu_us is not None and logged.cpu_us is not None:
        summary.append(
            f"Envoy CPU per request: {envoy.cpu_us:.1f} µs as it ships (no access log), "
            f"{logged.cpu_us:.1f} µs with a JSON access log to a pipe (the log costs "
            f"{logged.cpu_us - envoy.cpu_us:.1f} µs)."
        )
    if logged and report.envoy_log_lines is not None:
        counted = sum(run.requests for run in logged.runs)
        summary.append(
            f"Envoy's access log holds {report.envoy_log_lines:,} lines for the {counted:,} "
            f"requests of its measured runs (and their warm-ups, not counted): "
            f"{'one per request' if report.envoy_log_lines >= counted else 'LINES MISSING'}."
        )
    for peer, why in report.missing_peers.items():
        summary.append(f"{peer}: not in this run: {why}.")
    if report.neighbour_wall:
        share = report.neighbour_cpu / report.neighbour_wall
        summary.append(
            f"The proxies waiting on core 0 while another target was measured (throughput and "
            f"latency) used {report.neighbour_cpu:.2f} s of CPU in {report.neighbour_wall:.0f} s "
            f"({share:.1%} of the core): {'negligible' if share < 0.01 else 'NOT negligible'}."
        )
    return [*out, "", *(f"- {text}" for text in summary)]


def redis_section(usage: RedisUsage) -> list[str]:
    out = [
        "## Redis commands per request (gateway, Redis storage)",
        "",
        f"`INFO commandstats` after `CONFIG RESETSTAT`, summed over the rounds and divided by the "
        f"{usage.requests:,} requests wrk counted (the benchmark's own INFO/CONFIG left out). "
        "Redis counts the commands a Lua script runs as well; which ones the gateway sent itself "
        f"was seen with `MONITOR` over {usage.sample_requests} sequential requests.",
        "",
        "| command | calls | per request | µs in Redis per call | sent by |",
        "|---|---:|---:|---:|---|",
    ]
    for command, calls in usage.calls.most_common():
        sender = "gateway" if command in usage.sample_client else "Lua script"
        if command not in usage.sample_client and command not in usage.sample_script:
            sender = "not in the MONITOR sample"
        micros = usage.usec[command] / max(calls, 1)
        out.append(
            f"| {command} | {calls:,} | {usage.per_request(calls):.3f} | {micros:.1f} | {sender} |"
        )
    sent = ", ".join(f"{cmd} {n}" for cmd, n in usage.sample_client.most_common())
    lines = [
        *out,
        "",
        f"Sent by the gateway in the MONITOR sample: {sent or 'nothing'} "
        f"= {usage.round_trips:.3f} per request.",
    ]
    if usage.calls.get("evalsha"):
        # An EVALSHA's time is its whole script's, the commands inside included.
        micros = usage.usec["evalsha"] / usage.calls["evalsha"]
        lines += [
            "",
            f"Redis spends {micros:.1f} µs on each limiter hit (the EVALSHA with its script): "
            f"one Redis, single-threaded, runs at most about {1e6 / micros:,.0f} hits a second on "
            "this machine, for all the gateways that share it.",
        ]
    return lines


def latency_section(report: Report) -> list[str]:
    first, gateway = report.latency[0], report.latency[-1]
    out = [
        "## Latency at half the gateway's maximum",
        "",
        f"h2load, {first.offered_rps:,.0f} req/s offered (half the shipped defaults' median) "
        f"over {report.connections} connections opened 1 ms apart, for {report.duration} s, "
        f"{len(report.latency_rounds)} interleaved rounds; each figure the median of the "
        "rounds (a p99 rests on the slowest 1% of one run, which a short stall of the machine "
        "decides), from h2load's per-request `--log-file`, every answered request included. "
        "nginx proxy_pass runs on the gateway's core: its p99 shows how much of a p99 comes from "
        "the machine (scheduler, other processes) rather than from the proxy. h2load runs "
        "with real-time priority where it may (`chrt -f 10`; the command below says whether it "
        "did): descheduled, it sends the requests of every late timer at once, and a proxy "
        "serves such a burst one request after another. 'In bursts' is the share of requests "
        "sent 10 or more together (each within 100 µs of the one before); when it passes 1%, "
        "the p99 is about the burst's size times the proxy's CPU time per request.",
        "",
        "| target | achieved req/s | p50 ms | p99 ms | not 200 | in bursts |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r.name} | {r.achieved_rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.not_ok} "
        f"| {100 * r.in_bursts:.1f}% |"
        for r in report.latency
    ]
    added_p50 = gateway.p50_ms - first.p50_ms
    out.append(f"| **added by the gateway** | | {added_p50:.2f} | {report.added_p99:.2f} | | |")
    rounds = ", ".join(f"{added:.2f}" for added in report.added_p99s)
    out += ["", f"The p99 added in each round, in order: {rounds} ms."]
    return out


def own_python(report: Report) -> str:
    if not report.own_python:
        return ""
    return f"; the bench's own (row '{GW_OWN_PYTHON}'): {report.own_python}"


def measured_checkout() -> str:
    """Which code the gateway rows ran: the checkout and its commit (dirty if edited)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(GATEWAY_CHECKOUT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown commit"
    return f"{GATEWAY_CHECKOUT} at {commit}"


def render(report: Report) -> str:
    out = [
        "# Gateway benchmark results",
        "",
        f"- date: {report.started:%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- versions: {versions(report.peer_versions)}",
        f"- gateway measured: {measured_checkout()}",
        f"- gateway's interpreter: {report.gateway_python}{own_python(report)}",
        f"- load average (1, 5, 15 min) at the start: {report.load_at_start}; other work on the "
        "machine shows up as a wide min..max",
        f"- CPU time taken by the hypervisor (steal, /proc/stat) during the run: {report.stolen};"
        " on a shared host that is time neither core could run, and a stall of whichever "
        "process it fell on",
        f"- run: `{report.command_line}`: {report.rounds} interleaved round(s) of "
        f"{report.duration} s per target, wrk with {report.connections} keep-alive connections",
        "- pinning: the proxies (nginx proxy_pass, Envoy with one worker thread, Traefik, the "
        "gateway with one worker) on core 0; wrk, h2load, the upstream nginx, Redis and the "
        "reader of the gateway's stdout on core 1",
        "",
        *throughput_section(report),
        "",
        *redis_section(report.redis),
    ]
    if report.core_loads:
        out += ["", *core_section(report)]
    if report.latency_rounds:
        out += ["", *latency_section(report)]
    if report.rss is not None:
        out += ["", "## Memory while streaming a large response", ""]
        out += [f"- {text}" for text in rss_lines(report.rss)]
    out += ["", "## Targets", "", *verdicts(report), "", "## Commands", "", "```"]
    out += [f"# {label}\n{command}" for label, command in report.commands.items()]
    return "\n".join([*out, "```", ""])
