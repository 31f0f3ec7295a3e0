"""The gateway against nginx, Envoy and Traefik, measured in the same run on the same machine.

    make bench                      # or: .venv/bin/python bench/run.py [--duration 10] [--rounds 3]
    .venv/bin/python bench/run.py --quick     # 3 s smoke run, one round, RESULTS.md left alone

Proxies (nginx proxy_pass, Envoy, Traefik, the gateway) run on core 0; wrk, h2load, the upstream
nginx, Redis and the reader of the gateway's stdout on core 1. Every round measures each target
once, in the same order, with a fresh gateway process; the tables show medians over the rounds.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import redis
from harness import (
    API_KEY,
    BENCH_DIR,
    KEY_HEADER,
    BenchError,
    Child,
    GatewayPorts,
    Procs,
    bench_workspace,
    expect,
    free_port,
    gateway_argv,
    listeners,
    pinned,
    raise_on_sigterm,
    read_access_log,
    real_time,
    require_tools,
    session_cpu_seconds,
    start_gateway,
    start_log_reader,
    start_nginx_proxy,
    start_redis,
    start_upstream,
    use_python,
    write_gateway_config,
)
from interpreter import Interpreter, fastest_python, running_python
from peers import (
    ENVOY,
    ENVOY_LOGGED,
    Peers,
    default_peers_dir,
    install_peers,
    start_envoy,
    start_traefik,
)
from report import (
    DIRECT,
    GW_MEMORY,
    GW_OWN_PYTHON,
    GW_REDIS,
    GW_SHIPPED,
    NGINX,
    AccessLogCheck,
    CoreLoad,
    Latency,
    RedisUsage,
    Report,
    TargetResult,
    WrkRun,
    render,
)
from rss_stream import measure_rss

PATH = "/bench/ok"
PORT_ATTEMPTS = 3
START_CHECKS = 2  # requests start_gateway sends to check a gateway: with the key and without
MONITOR_REQUESTS = 500
OWN_REDIS_COMMANDS = ("info", "config")  # what the benchmark itself sends during a run
MONITOR_END = "bench-monitor-end"


@dataclass
class Bench:
    """The running setup: ports, child processes, and what was measured on the way."""

    args: argparse.Namespace
    tmp: Path
    procs: Procs
    peers: Peers
    upstream_port: int = field(default_factory=free_port)
    nginx_port: int = field(default_factory=free_port)
    redis_port: int = field(default_factory=free_port)
    peer_ports: dict[str, int] = field(default_factory=dict)
    leaders: dict[str, int] = field(default_factory=dict)  # target -> pid whose session serves it
    commands: dict[str, str] = field(default_factory=dict)  # what ran, for RESULTS.md
    redis_usage: RedisUsage = field(default_factory=RedisUsage)
    access_log: AccessLogCheck = field(default_factory=AccessLogCheck)
    last_log_lines: int = 0  # what the last shipped gateway wrote to its stdout
    python: Interpreter | None = None  # what the gateway runs under (None: the bench's own)
    # CPU the proxies that run all along on core 0 (nginx, the peers) spent while another
    # target was measured, and how long those measurements took: an idle proxy that wakes
    # (as Traefik did for every access log write) takes turns with the one measured.
    neighbour_cpu: float = 0.0
    neighbour_wall: float = 0.0
    envoy_log: Path | None = None  # where the Envoy row with an access log writes it
    redis_pid: int = 0
    peer_children: list[Child] = field(default_factory=list)  # Envoy's, Traefik's processes
    reader_pid: int = 0  # the running gateway's log reader, if it logs
    core_loads: dict[str, list[CoreLoad]] = field(default_factory=dict)  # see CoreLoad

    store: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        self.store = redis.Redis(port=self.redis_port, decode_responses=True, socket_timeout=30)
        for name in self.peers.binaries:
            self.peer_ports[name] = free_port()
            if name == ENVOY:
                self.peer_ports[ENVOY_LOGGED] = free_port()  # the same binary, logging

    def note(self, label: str, argv: list[str], env: str = "", redirect: str = "") -> None:
        line = " ".join(filter(None, [env, shlex.join(argv), redirect]))
        self.commands.setdefault(label, line.replace(str(self.tmp), "$TMP"))

    def wrk(self, label: str, port: int, seconds: int) -> WrkRun:
        """wrk against `port`, with the CPU time the target's processes spent meanwhile."""
        argv = [
            *pinned(1), "wrk", "-t1", f"-c{self.args.connections}", f"-d{seconds}s",
            "-H", f"X-API-Key: {API_KEY}", f"http://127.0.0.1:{port}{PATH}",
        ]  # fmt: skip
        if seconds == self.args.duration:
            self.note(f"wrk ({label}; after a 1 s warm-up)", argv)
        leader = self.leaders.get(label)
        cpu_before = session_cpu_seconds(leader) if leader else 0.0
        core_before = self._core_one()
        with self.watching_neighbours(label, seconds):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
        cpu = session_cpu_seconds(leader) - cpu_before if leader else None
        core_after = self._core_one()
        if done.returncode != 0:
            raise BenchError(f"wrk against {label} failed:\n{done.stdout}{done.stderr}")
        run = parse_wrk(done.stdout, cpu)
        if seconds == self.args.duration:
            spent = [after - before for before, after in zip(core_before, core_after, strict=True)]
            load = CoreLoad(run.requests, *spent)
            self.core_loads.setdefault(label, []).append(load)
        return run

    def _core_one(self) -> tuple[float, float, float, float, float]:
        """Core 1's busy time and its processes' CPU times, in seconds, as CoreLoad orders
        them: wrk's from the children this process has waited for (wrk is the only one)."""
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        upstream = session_cpu_seconds(self.leaders[DIRECT])
        redis_cpu = session_cpu_seconds(self.redis_pid)
        reader = session_cpu_seconds(self.reader_pid) if self.reader_pid else 0.0
        return (
            core_busy_seconds(1),
            children.ru_utime + children.ru_stime,
            upstream,
            redis_cpu,
            reader,
        )

    @contextmanager
    def watching_neighbours(self, target: str, seconds: float) -> Iterator[None]:
        """Add what the other core-0 fixtures spent during a run against `target` (warm-ups
        included: the neighbours should be idle then too)."""
        pids = [self.leaders[name] for name in (NGINX, *self.peer_ports) if name != target]
        before = sum(session_cpu_seconds(pid) for pid in pids)
        yield
        self.neighbour_cpu += sum(session_cpu_seconds(pid) for pid in pids) - before
        self.neighbour_wall += seconds


def core_busy_seconds(core: int) -> float:
    """The time `core` has spent on anything but idling, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            ticks = [int(word) for word in line.split()[1:]]
            # user nice system idle iowait irq softirq steal (guest time is in user already)
            return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    raise BenchError(f"no cpu{core} in /proc/stat")


def parse_wrk(text: str, cpu_seconds: float | None = None) -> WrkRun:
    requests, rps, bad = None, None, 0
    for line in (line.strip() for line in text.splitlines()):
        words = line.replace(",", "").split()
        if "requests in" in line:
            requests = int(words[0])
        elif line.startswith("Requests/sec:"):
            rps = float(words[1])
        elif line.startswith("Non-2xx or 3xx responses:"):
            bad += int(words[-1])
        elif line.startswith("Socket errors:"):
            bad += sum(int(word) for word in words if word.isdigit())
    if requests is None or rps is None:
        raise BenchError(f"cannot read wrk's output:\n{text}")
    cpu_us = None if cpu_seconds is None else cpu_seconds * 1e6 / max(requests, 1)
    return WrkRun(requests, rps, bad, cpu_us)


@contextmanager
def running_gateway(bench: Bench, name: str) -> Iterator[int]:
    """A fresh gateway process (checked to admit the key and refuse no key); yields its port.

    The shipped defaults log every request to stdout, here a pipe that `cat` copies to a file
    on core 1, as a container runtime reads a container's stdout; the other gateways run with
    GATEWAY_ACCESS_LOG=off.
    """
    storage = "memory://" if name == GW_MEMORY else f"redis://127.0.0.1:{bench.redis_port}/0"
    access_log = name in (GW_SHIPPED, GW_OWN_PYTHON)
    python = sys.executable if name == GW_OWN_PYTHON else None
    slug = name.split(" (")[0].replace(", ", "-").replace(" ", "-")
    log = bench.tmp / f"{slug}-access.log"
    for attempt in range(1, PORT_ATTEMPTS + 1):
        # Fresh ports each time: the gateway binds with SO_REUSEPORT, so a process of someone
        # else that took a port we used before would silently share its connections.
        ports = GatewayPorts(free_port(), free_port())
        config = write_gateway_config(
            bench.tmp / f"{slug}.yaml", ports, storage, bench.upstream_port
        )
        env = f"GATEWAY_ACCESS_LOG={'on' if access_log else 'off'}"
        redirect = f"| {shlex.join([*pinned(1), 'cat'])} > {log}" if access_log else ""
        bench.note(f"gateway ({name})", gateway_argv(config, python=python), env, redirect)
        if storage != "memory://":
            bench.store.flushall()  # every run starts from the same (empty) counters
        reader, stdout = None, None
        if access_log:
            reader, stdout = start_log_reader(bench.procs, f"{slug}-reader", log)
            bench.reader_pid = reader.popen.pid
        try:
            child = start_gateway(
                bench.procs, bench.tmp, slug, config, ports.proxy, access_log, stdout, python
            )
        except BenchError:
            if reader is not None:
                bench.procs.stop(reader)
            if attempt == PORT_ATTEMPTS or listeners(ports.proxy) == 0:
                raise
            print(f"  {name}: port {ports.proxy} is shared with another process; new ports")
            continue
        finally:
            if stdout is not None:
                os.close(stdout)  # the gateway holds the pipe's only write end now
        if listeners(ports.proxy) == 1:
            break
        bench.procs.stop(child)
        if reader is not None:
            bench.procs.stop(reader)
        if attempt == PORT_ATTEMPTS:
            raise BenchError(f"{name}: port {ports.proxy} is shared with another process")
    bench.leaders[name] = child.popen.pid
    try:
        yield ports.proxy
    finally:
        bench.reader_pid = 0
        bench.procs.stop(child)
        if child.popen.returncode != 0:
            print(f"  {name} exited with {child.popen.returncode}:\n{child.tail()}")
        if reader is not None:
            reader.popen.wait(10)  # the end of the pipe: every line is in the file
            bench.procs.stop(reader)
            bench.last_log_lines, broken = read_access_log(log)
            bench.access_log.broken += broken
            log.unlink()


# --- the targets ---------------------------------------------------------------------------


def run_fixture(bench: Bench, name: str, port: int) -> WrkRun:
    """A target that runs for the whole benchmark: the upstream, nginx, a peer."""
    bench.wrk(name, port, 1)
    return bench.wrk(name, port, bench.args.duration)


def run_gateway(bench: Bench, name: str) -> WrkRun:
    with running_gateway(bench, name) as port:
        warm_up = bench.wrk(name, port, 1)
        if name != GW_SHIPPED:
            return bench.wrk(name, port, bench.args.duration)
        bench.store.config_resetstat()
        run = bench.wrk(name, port, bench.args.duration)
        count_redis_commands(bench, run.requests)
    # Logged: the two start-up checks, every request wrk counted, and those wrk left unanswered
    # when it stopped (at most one per connection and wrk run).
    check = bench.access_log
    check.lines += bench.last_log_lines
    check.counted += START_CHECKS + warm_up.requests + run.requests
    check.cut_off_at_most += 2 * bench.args.connections
    return run


def targets(bench: Bench) -> dict[str, Callable[[], WrkRun]]:
    """What each round measures, in order: the fixtures and peers first, then the gateways."""
    found: dict[str, Callable[[], WrkRun]] = {
        DIRECT: lambda: run_fixture(bench, DIRECT, bench.upstream_port),
        NGINX: lambda: run_fixture(bench, NGINX, bench.nginx_port),
    }
    for name, port in bench.peer_ports.items():
        found[name] = partial(run_fixture, bench, name, port)
    for name in (GW_SHIPPED, GW_REDIS, GW_MEMORY):
        found[name] = partial(run_gateway, bench, name)
    if bench.python is not None and bench.python.path != sys.executable:
        found[GW_OWN_PYTHON] = partial(run_gateway, bench, GW_OWN_PYTHON)
    return found


# --- Redis usage ---------------------------------------------------------------------------


def count_redis_commands(bench: Bench, requests: int) -> None:
    for key, values in bench.store.info("commandstats").items():
        command = key.removeprefix("cmdstat_")
        if not command.startswith(OWN_REDIS_COMMANDS):
            bench.redis_usage.calls[command] += int(values["calls"])
            bench.redis_usage.usec[command] += int(values["usec"])
    bench.redis_usage.requests += requests


def sample_redis_commands(bench: Bench) -> None:
    """Tell the commands the gateway sends from those its Lua scripts run, with MONITOR.

    INFO commandstats counts both alike; MONITOR marks a script's commands with "lua". It slows
    Redis down, so it watches a short sequential sample, never a throughput run.
    """
    usage = bench.redis_usage
    with running_gateway(bench, GW_SHIPPED) as port:
        expect(port, PATH, KEY_HEADER, 200, "gateway before MONITOR")
        with bench.store.monitor() as monitor:  # type: ignore[no-untyped-call]
            for _ in range(MONITOR_REQUESTS):
                expect(port, PATH, KEY_HEADER, 200, "gateway under MONITOR")
            bench.store.echo(MONITOR_END)
            seen = []
            for command in monitor.listen():
                seen.append(command)
                if command["command"] == f"ECHO {MONITOR_END}":
                    break
    ours = seen[-1]["client_port"]  # the connection that sent the ECHO (and maybe its HELLO)
    for command in seen:
        if command["client_port"] != ours:
            name = command["command"].split(" ", 1)[0].lower()
            lua = command["client_type"] == "lua"
            (usage.sample_script if lua else usage.sample_client)[name] += 1
    usage.sample_requests = MONITOR_REQUESTS


# --- latency at a fixed rate ---------------------------------------------------------------


def h2load_latency(bench: Bench, name: str, port: int, rate: float) -> Latency:
    log = bench.tmp / f"h2load-{port}.tsv"
    # HTTP/1.1 has one request in flight per connection. With as many connections as wrk, each
    # sends a request every ~15 ms, far less often than it is answered, so a slow answer does
    # not postpone the next request. h2load fires each connection's request timer from the
    # moment it connected: opening them 1 ms apart (-r1) keeps them from firing all together,
    # which would measure a queue of 50 simultaneous requests instead of the gateway; real-time
    # priority keeps a stall of h2load from bringing them together again (harness.real_time).
    clients = bench.args.connections
    argv = [
        *real_time(), *pinned(1),
        "h2load", "--h1", "-t1", f"-c{clients}", "-r1", "--rate-period=1ms",
        f"--rps={rate / clients:.2f}", f"-n{round(rate * bench.args.duration)}",
        f"--log-file={log}", "-H", f"X-API-Key: {API_KEY}", f"http://127.0.0.1:{port}{PATH}",
    ]  # fmt: skip
    bench.note(f"h2load ({name}; --rps is per connection)", argv)
    # h2load appends to a log that exists: each round of a target (same port) reads its own.
    log.unlink(missing_ok=True)
    with bench.watching_neighbours(name, bench.args.duration):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    finished = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", done.stdout)
    if done.returncode != 0 or not log.exists() or finished is None:
        raise BenchError(f"h2load against {name} failed:\n{done.stdout}{done.stderr}")
    # Rows: start (us since epoch), status (-1 for a failed stream), us until the response ended.
    rows = [line.split("\t")[:3] for line in log.read_text().splitlines()]
    micros = sorted(int(elapsed) for _start, status, elapsed in rows if status != "-1")
    if not micros:
        raise BenchError(f"h2load against {name}: no answered request\n{done.stdout}")
    return Latency(
        name=name,
        offered_rps=rate,
        achieved_rps=float(finished.group(1)),
        p50_ms=percentile(micros, 50) / 1000,
        p99_ms=percentile(micros, 99) / 1000,
        not_ok=sum(1 for _start, status, _elapsed in rows if status != "200"),
        in_bursts=burst_share(sorted(int(start) for start, _status, _elapsed in rows)),
    )


def burst_share(starts: list[int]) -> float:
    """The share of requests h2load sent in bursts: 10 or more, each started within 100 µs of
    the one before (its connections' timers fired together after h2load had been stalled;
    see harness.real_time). A proxy serves such a burst one request after another."""
    in_bursts, run = 0, 1
    for before, start in itertools.pairwise(starts):
        if start - before <= 100:
            run += 1
            continue
        in_bursts += run if run >= 10 else 0
        run = 1
    in_bursts += run if run >= 10 else 0
    return in_bursts / len(starts) if starts else 0.0


def percentile(ordered: list[int], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def measure_latency(bench: Bench, rate: float) -> list[list[Latency]]:
    """Per round: the upstream direct, nginx, the gateway as shipped, one after the other."""
    rounds = []
    with running_gateway(bench, GW_SHIPPED) as port:
        bench.wrk(GW_SHIPPED, port, 1)
        for _round in range(bench.args.rounds):
            rounds.append(
                [
                    h2load_latency(bench, DIRECT, bench.upstream_port, rate),
                    h2load_latency(bench, NGINX, bench.nginx_port, rate),
                    h2load_latency(bench, GW_SHIPPED, port, rate),
                ]
            )
    return rounds


# --- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the gateway against its peers.")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement (10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--rss-mb", type=int, default=1024, help="streamed response, MiB (1024)")
    parser.add_argument("--quick", action="store_true", help="one round of 3 s; no RESULTS.md")
    parser.add_argument("--results", type=Path, help="where to write (default bench/RESULTS.md)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    parser.add_argument(
        "--peers-dir",
        type=Path,
        default=default_peers_dir(),
        help="venv for Envoy and Traefik (default ~/.cache/gateway-bench/peers)",
    )
    parser.add_argument("--no-peers", action="store_true", help="nginx only; no Envoy, Traefik")
    parser.add_argument(
        "--python",
        help="the Python to run the gateway under (default: the fastest 3.11+ found; see "
        "interpreter.py)",
    )
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 3, 1
    if args.results is None and not args.quick:
        args.results = BENCH_DIR / "RESULTS.md"
    return args


def start_fixtures(bench: Bench) -> None:
    tmp, procs = bench.tmp, bench.procs
    upstream = start_upstream(procs, tmp, bench.upstream_port)
    nginx = start_nginx_proxy(procs, tmp, bench.nginx_port, bench.upstream_port)
    redis_server = start_redis(procs, tmp, bench.redis_port)
    for label, child in (("upstream nginx", upstream), (NGINX, nginx), ("redis", redis_server)):
        bench.note(label, child.argv)
    bench.leaders[DIRECT], bench.leaders[NGINX] = upstream.popen.pid, nginx.popen.pid
    bench.redis_pid = redis_server.popen.pid
    expect(bench.upstream_port, PATH, KEY_HEADER, 200, "upstream nginx")
    expect(bench.nginx_port, PATH, KEY_HEADER, 200, "nginx proxy_pass")
    peers = bench.peers
    for name, port in list(bench.peer_ports.items()):
        binary = peers.binaries[ENVOY if name == ENVOY_LOGGED else name]
        redirect = ""
        try:
            if name == ENVOY:
                child = start_envoy(procs, tmp, binary, port, bench.upstream_port)
            elif name == ENVOY_LOGGED:
                log = bench.envoy_log = tmp / "envoy-access.log"
                child = start_envoy(procs, tmp, binary, port, bench.upstream_port, log)
                redirect = f"| {shlex.join([*pinned(1), 'cat'])} > {log}"
            else:
                child = start_traefik(
                    procs, tmp, binary, port, bench.upstream_port, bench.redis_port
                )
        except BenchError as exc:
            print(f"{name}: left out, it does not serve: {exc}", flush=True)
            peers.missing[name] = f"does not serve: {str(exc).splitlines()[0]}"
            del bench.peer_ports[name]
            continue
        bench.note(name, child.argv, redirect=redirect)
        bench.leaders[name] = child.popen.pid
        bench.peer_children.append(child)


def envoy_log_lines(bench: Bench) -> int | None:
    """The lines Envoy's access log holds by now (its buffer is flushed every second, and the
    latency and memory steps ran since its last measurement): a row named for its log must
    have written one per request."""
    if bench.envoy_log is None or not bench.envoy_log.exists():
        return None
    with bench.envoy_log.open("rb") as log:
        return sum(1 for _line in log)


def stolen_seconds() -> float:
    """The CPU time the hypervisor has taken from this machine's cores (steal, /proc/stat)."""
    ticks = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(ticks[8]) / os.sysconf("SC_CLK_TCK")  # cpu user nice system idle ... steal


def run(bench: Bench, started: datetime) -> Report:
    load_at_start = ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    stolen_before, wall_before = stolen_seconds(), time.monotonic()
    start_fixtures(bench)
    measures = targets(bench)
    throughput = {name: TargetResult(name) for name in measures}
    for round_number in range(1, bench.args.rounds + 1):
        for name, measure in measures.items():
            result = measure()
            throughput[name].runs.append(result)
            cpu = "" if result.cpu_us is None else f" {result.cpu_us:7.1f} CPU µs/request"
            print(f"round {round_number}: {name:55} {result.rps:10,.0f} req/s{cpu}", flush=True)
    # The peers are measured only for throughput. Left idle on core 0 they still wake (each
    # Envoy ~36 times a second) and take turns with whichever target is timed; the latency
    # phase times only the upstream, nginx and the gateway, so the peers stop first.
    for child in bench.peer_children:
        bench.procs.stop(child)
    print("which Redis commands the gateway sends (MONITOR) ...", flush=True)
    sample_redis_commands(bench)
    rate = throughput[GW_SHIPPED].median / 2
    print(f"latency at {rate:,.0f} req/s ...", flush=True)
    latency = measure_latency(bench, rate)
    print(f"streaming {bench.args.rss_mb} MiB through the gateway ...", flush=True)
    (bench.tmp / "rss").mkdir()
    rss = measure_rss(bench.procs, bench.tmp / "rss", bench.args.rss_mb)
    stolen = stolen_seconds() - stolen_before
    machine_seconds = (time.monotonic() - wall_before) * (os.cpu_count() or 1)
    args = bench.args
    return Report(
        started=started,
        load_at_start=load_at_start,
        stolen=f"{stolen:.1f} s of {machine_seconds:.0f} CPU-s ({stolen / machine_seconds:.1%})",
        command_line=shlex.join(["python", "bench/run.py", *sys.argv[1:]]),
        rounds=args.rounds,
        duration=args.duration,
        connections=args.connections,
        throughput=throughput,
        redis=bench.redis_usage,
        latency_rounds=latency,
        rss=rss,
        commands=bench.commands,
        peer_versions=bench.peers.versions,
        missing_peers=bench.peers.missing,
        access_log=bench.access_log,
        gateway_python=bench.python.describe() if bench.python else "",
        neighbour_cpu=bench.neighbour_cpu,
        neighbour_wall=bench.neighbour_wall,
        envoy_log_lines=envoy_log_lines(bench),
        own_python=running_python().describe() if GW_OWN_PYTHON in throughput else "",
        core_loads=bench.core_loads,
    )


def main() -> int:
    args = parse_args()
    require_tools(["nginx", "redis-server", "wrk", "h2load", "taskset"])
    raise_on_sigterm()
    started = datetime.now(UTC)
    peers = install_peers(args.peers_dir, wanted=not args.no_peers)
    for name, why in peers.missing.items():
        print(f"{name}: left out: {why}", flush=True)
    with bench_workspace("gateway-bench-", args.keep) as procs:
        bench = Bench(args, procs.logs, procs, peers)
        bench.python = fastest_python(args.peers_dir.parent, args.python)
        use_python(bench.python.path)
        print(f"gateway's interpreter: {bench.python.describe()}", flush=True)
        try:
            report = render(run(bench, started))
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
    print("\n" + report)
    if args.results is not None:
        args.results.write_text(report)
        print(f"written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
