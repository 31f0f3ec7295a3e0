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

from rss_stream import RssResult
from rss_stream import report_lines as rss_lines

NGINX, GW_REDIS, GW_MEMORY, GW_LOG = (
    "nginx proxy_pass",
    "gateway, redis",
    "gateway, memory",
    "gateway, redis, access log on",
)


@dataclass(frozen=True)
class WrkRun:
    requests: int
    rps: float
    bad_responses: int  # non-2xx plus socket errors


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


@dataclass(frozen=True)
class Latency:
    name: str
    offered_rps: float
    achieved_rps: float
    p50_ms: float
    p99_ms: float
    not_ok: int  # answered with another status than 200, or failed


@dataclass
class RedisUsage:
    calls: Counter[str] = field(default_factory=Counter)  # INFO commandstats over the wrk runs
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
    command_line: str
    rounds: int
    duration: int
    connections: int
    throughput: dict[str, TargetResult]
    redis: RedisUsage
    latency: list[Latency]  # direct first, the gateway last
    rss: RssResult | None
    commands: dict[str, str]


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


def versions() -> str:
    tools = [["nginx", "-v"], ["redis-server", "--version"], ["wrk", "-v"], ["h2load", "--version"]]
    python = f"Python {platform.python_version()}, aiohttp {version('aiohttp')}"
    return "; ".join([python, *(tool_version(argv) for argv in tools)])


def verdicts(report: Report) -> list[str]:
    def line(ok: bool, text: str) -> str:
        return f"- {'PASS' if ok else 'FAIL'}: {text}"

    nginx, gw_redis, gw_memory = (report.throughput[n].median for n in (NGINX, GW_REDIS, GW_MEMORY))
    share = gw_redis / nginx
    stretch = "met" if share >= 0.50 else "not met"
    trips = report.redis.round_trips
    lines = [
        line(share >= 0.30, f"gateway (Redis) >= 0.30 of nginx proxy_pass: {share:.2f} "
             f"(stretch 0.50 {stretch})"),
        line(gw_redis >= 0.85 * gw_memory,
             f"Redis storage within 15% of memory storage: {gw_redis / gw_memory:.2f}"),
        line(round(trips, 2) <= 1.0, f"at most one Redis round trip per admitted request: "
             f"{trips:.3f} commands sent per request"),
    ]  # fmt: skip
    if report.latency:
        added = report.latency[-1].p99_ms - report.latency[0].p99_ms
        lines.append(line(added <= 5.0, f"added p99 at half load <= 5 ms: {added:.2f} ms"))
    if report.rss is not None:
        growth = report.rss.growth_mb
        text = f"RSS growth while proxying {report.rss.size_mb} MiB < 32 MiB: {growth:.1f} MiB"
        lines.append(line(growth < 32, text))
    return lines


def throughput_section(report: Report) -> list[str]:
    nginx = report.throughput[NGINX].median
    out = [
        "## Throughput",
        "",
        "| target | req/s median | min | max | ratio to nginx |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, result in report.throughput.items():
        flag = f" ({result.bad_responses} bad responses)" if result.bad_responses else ""
        out.append(
            f"| {name}{flag} | {result.median:,.0f} | {result.low:,.0f} | {result.high:,.0f} "
            f"| {result.median / nginx:.2f} |"
        )
    gw_redis, gw_memory, gw_log = (
        report.throughput[n].median for n in (GW_REDIS, GW_MEMORY, GW_LOG)
    )
    return [
        *out,
        "",
        f"gateway/nginx: Redis storage {gw_redis / nginx:.2f}, memory storage "
        f"{gw_memory / nginx:.2f}; Redis/memory storage {gw_redis / gw_memory:.2f}; "
        f"access log on (stdout to /dev/null) / off, Redis storage {gw_log / gw_redis:.2f}.",
    ]


def redis_section(usage: RedisUsage) -> list[str]:
    out = [
        "## Redis commands per request (gateway, Redis storage)",
        "",
        f"`INFO commandstats` after `CONFIG RESETSTAT`, summed over the rounds and divided by the "
        f"{usage.requests:,} requests wrk counted (the benchmark's own INFO/CONFIG left out). "
        "Redis counts the commands a Lua script runs as well; which ones the gateway sent itself "
        f"was seen with `MONITOR` over {usage.sample_requests} sequential requests.",
        "",
        "| command | calls | per request | sent by |",
        "|---|---:|---:|---|",
    ]
    for command, calls in usage.calls.most_common():
        sender = "gateway" if command in usage.sample_client else "Lua script"
        if command not in usage.sample_client and command not in usage.sample_script:
            sender = "not in the MONITOR sample"
        out.append(f"| {command} | {calls:,} | {usage.per_request(calls):.3f} | {sender} |")
    sent = ", ".join(f"{cmd} {n}" for cmd, n in usage.sample_client.most_common())
    return [
        *out,
        "",
        f"Sent by the gateway in the MONITOR sample: {sent or 'nothing'} "
        f"= {usage.round_trips:.3f} per request.",
    ]


def latency_section(report: Report) -> list[str]:
    first, gateway = report.latency[0], report.latency[-1]
    out = [
        "## Latency at half the gateway's maximum",
        "",
        f"h2load, {first.offered_rps:,.0f} req/s offered (half the gateway's median with Redis) "
        f"over {report.connections} connections opened 1 ms apart, for {report.duration} s; "
        "p50/p99 from its per-request `--log-file`, every answered request included. nginx "
        "proxy_pass runs on the gateway's core: its p99 shows how much of a p99 comes from the "
        "machine (scheduler, other processes) rather than from the proxy.",
        "",
        "| target | achieved req/s | p50 ms | p99 ms | not 200 |",
        "|---|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r.name} | {r.achieved_rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.not_ok} |"
        for r in report.latency
    ]
    added_p50, added_p99 = gateway.p50_ms - first.p50_ms, gateway.p99_ms - first.p99_ms
    out.append(f"| **added by the gateway** | | {added_p50:.2f} | {added_p99:.2f} | |")
    return out


def render(report: Report) -> str:
    out = [
        "# Gateway benchmark results",
        "",
        f"- date: {report.started:%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- versions: {versions()}",
        f"- load average (1, 5, 15 min) at the start: {report.load_at_start}; other work on the "
        "machine shows up as a wide min..max",
        f"- run: `{report.command_line}`: {report.rounds} interleaved round(s) of "
        f"{report.duration} s per target, wrk with {report.connections} keep-alive connections",
        "- pinning: nginx proxy and gateway (one worker) on core 0; wrk, h2load, the upstream "
        "nginx and Redis on core 1",
        "",
        *throughput_section(report),
        "",
        *redis_section(report.redis),
    ]
    if report.latency:
        out += ["", *latency_section(report)]
    if report.rss is not None:
        out += ["", "## Memory while streaming a large response", ""]
        out += [f"- {text}" for text in rss_lines(report.rss)]
    out += ["", "## Targets", "", *verdicts(report), "", "## Commands", "", "```"]
    out += [f"# {label}\n{command}" for label, command in report.commands.items()]
    return "\n".join([*out, "```", ""])
