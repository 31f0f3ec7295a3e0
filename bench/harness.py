"""Child processes for the benchmarks: nginx, redis-server and the gateway on free loopback ports.

Every child gets its own session (so a Ctrl-C reaches only the benchmark, which then stops the
children in order) and a parent-death signal (so not even a SIGKILL of the benchmark leaves them
running). `Procs.stop_all` is registered with atexit as well as called on leaving
`bench_workspace`, the temp dir and children of one benchmark run.
"""

from __future__ import annotations

import atexit
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
API_KEY = "bench-key"
KEY_HEADER = {"X-API-Key": API_KEY}
OK_BODY = b'{"ok":true}'

# tool -> Debian/Ubuntu package that provides it
APT_PACKAGES = {
    "nginx": "nginx",
    "redis-server": "redis-server",
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "taskset": "util-linux",
}


class BenchError(Exception):
    """The setup is broken, so a measurement would be worthless."""


def require_tools(names: list[str]) -> dict[str, str]:
    found = {name: shutil.which(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        packages = " ".join(sorted({APT_PACKAGES[name] for name in missing}))
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        print(f"install them with:  sudo apt-get install -y {packages}", file=sys.stderr)
        sys.exit(2)
    return {name: path for name, path in found.items() if path is not None}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def real_time() -> list[str]:
    """`chrt -f 10` (SCHED_FIFO) where this user may use it, else nothing.

    For the open-loop latency client: h2load fires each connection's request timer on time only
    while it runs. Descheduled on core 1 (the upstream, Redis and the log's reader share it) for
    longer than the spacing of its connections, it fires every late timer at once when it runs
    again, and libev restarts them from that moment: the 50 connections then send together
    until the next stall parts them, and a proxy serving one request at a time makes the last
    of 50 wait 49 of its own CPU times. Measured here beside other work, against nginx alone:
    11-36% of requests sent in such bursts without real-time priority, 1.5-2.4% with it
    (bench/PROFILE.md, "Session 19")."""
    try:
        allowed = subprocess.run(["chrt", "-f", "10", "true"], check=False).returncode == 0
    except OSError:
        allowed = False
    return ["chrt", "-f", "10"] if allowed else []


def pinned(core: int) -> list[str]:
    """`taskset -c core`, or nothing on a one-CPU machine where pinning apart is impossible."""
    if (os.cpu_count() or 1) < 2:
        return []
    return ["taskset", "-c", str(core)]


def _die_with_parent() -> None:
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes]

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Procs:
    logs: Path
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        atexit.register(self.stop_all)

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
    ) -> Child:
        """Start `argv`; its stdout goes to `stdout` (a file descriptor) or to its log."""
        log = self.logs / f"{name}.log"
        with log.open("ab") as sink:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=sink if stdout is None else stdout,
                stderr=sink,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, argv, log, popen)
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 15.0) -> None:
        if child in self.children:
            self.children.remove(child)
        if child.popen.poll() is not None:
            return
        # The child leads its own process group: this reaches nginx workers too.
        with _ignore_gone():
            os.killpg(child.popen.pid, signal.SIGTERM)
        try:
            child.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with _ignore_gone():
                os.killpg(child.popen.pid, signal.SIGKILL)
            child.popen.wait()

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)


@contextmanager
def bench_workspace(prefix: str, keep: bool = False) -> Iterator[Procs]:
    """A fresh temp dir (`procs.logs`: configs, certificates and the children's logs) and the
    children started in it. On leaving, however it is left, every child is stopped and the dir
    removed, or kept (and named) with `keep`."""
    procs = Procs(Path(tempfile.mkdtemp(prefix=prefix)))
    try:
        yield procs
    finally:
        procs.stop_all()
        if keep:
            print(f"logs kept in {procs.logs}")
        else:
            shutil.rmtree(procs.logs, ignore_errors=True)


class _ignore_gone:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, *_: Any) -> bool:
        return kind is not None and issubclass(kind, ProcessLookupError)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, and Ctrl-C into KeyboardInterrupt even when started in the
    background (where SIGINT arrives ignored), so `finally` blocks stop the children."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def http_get(
    port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_until_serving(child: Child, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.popen.poll() is not None:
            raise BenchError(f"{child.name} exited with {child.popen.returncode}:\n{child.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{child.name} did not open port {port} in {timeout:.0f}s:\n{child.tail()}")


def expect(port: int, path: str, headers: dict[str, str], status: int, what: str) -> None:
    got, body = http_get(port, path, headers)
    if got != status or (status == 200 and body != OK_BODY):
        raise BenchError(f"{what}: expected {status}, got {got} {body[:200]!r}")


# --- nginx ---------------------------------------------------------------------------------


def start_nginx(
    procs: Procs, tmp: Path, name: str, template: str, core: int, **values: Any
) -> Child:
    """Run nginx as the current user with every writable path inside `tmp/name`."""
    prefix = tmp / name
    prefix.mkdir(parents=True, exist_ok=True)
    text = Template((BENCH_DIR / template).read_text()).substitute(prefix=prefix, **values)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    error_log = prefix / "error.log"  # -e: else nginx first tries /var/log/nginx/error.log
    argv = [*pinned(core), "nginx", "-p", str(prefix), "-e", str(error_log), "-c", str(conf)]
    child = procs.start(name, argv)
    wait_until_serving(child, values["port"])
    return child


def start_upstream(procs: Procs, tmp: Path, port: int, core: int = 1) -> Child:
    """nginx answering `{"ok":true}`, and serving files under tmp/www (for the streaming test)."""
    www = tmp / "www"
    (www / "bench").mkdir(parents=True, exist_ok=True)
    # Run as root, nginx workers switch to an unprivileged user, which must reach the files.
    for directory in (tmp, www, www / "bench"):
        directory.chmod(0o755)
    return start_nginx(
        procs, tmp, "nginx-upstream", "nginx-upstream.conf.tmpl", core, port=port, www=www
    )


def start_nginx_proxy(
    procs: Procs, tmp: Path, port: int, upstream_port: int, core: int = 0
) -> Child:
    return start_nginx(
        procs,
        tmp,
        "nginx-proxy",
        "nginx-proxy.conf.tmpl",
        core,
        port=port,
        upstream_port=upstream_port,
    )


# --- redis ---------------------------------------------------------------------------------


def start_redis(procs: Procs, tmp: Path, port: int, core: int = 1) -> Child:
    argv = [
        *pinned(core), "redis-server", "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(tmp),
    ]  # fmt: skip
    child = procs.start("redis", argv)
    wait_until_serving(child, port)
    return child


# --- gateway -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayPorts:
    proxy: int
    admin: int


def write_gateway_config(
    path: Path, ports: GatewayPorts, storage_url: str, upstream_port: int
) -> Path:
    config = {
        "server": {
            "listen": f"127.0.0.1:{ports.proxy}",
            "admin_listen": f"127.0.0.1:{ports.admin}",
            "workers": 1,  # one process, so its pid is the one serving (and measured)
        },
        "storage": {"url": storage_url},
        "products": {
            "bench": {
                "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
                "routes": [{"path": "/bench/{rest:path}"}],
            }
        },
        # High enough to admit everything, yet every request still goes through the limiter.
        "plans": {
            "unlimited": {
                "rate": {"limit": 100_000_000, "per": "second"},
                "quota": {"limit": 1_000_000_000, "per": "month"},
            }
        },
        "keys": [{"name": "bench", "key": API_KEY, "plans": {"bench": "unlimited"}}],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# The checkout whose gateway is measured: this one, or another one with its own .venv
# (GATEWAY_BENCH_CHECKOUT=DIR), to compare two versions in one sitting under the same harness.
GATEWAY_CHECKOUT = Path(os.environ.get("GATEWAY_BENCH_CHECKOUT") or REPO).resolve()


# The interpreter the gateway runs under, when a script chose one (see interpreter.py).
_chosen_python: str | None = None


def use_python(python: str) -> None:
    global _chosen_python
    _chosen_python = python


def gateway_python() -> str:
    if _chosen_python is not None:
        return _chosen_python
    other = GATEWAY_CHECKOUT / ".venv" / "bin" / "python"
    return str(other) if REPO.resolve() != GATEWAY_CHECKOUT and other.exists() else sys.executable


def gateway_argv(config: Path, core: int = 0, python: str | None = None) -> list[str]:
    python = python or gateway_python()
    return [*pinned(core), python, "-m", "gateway", "run", "--config", str(config)]


def start_log_reader(procs: Procs, name: str, log: Path, core: int = 1) -> tuple[Child, int]:
    """`cat` copying a pipe into `log`, as a container runtime reads a container's stdout into
    its log files; returns the reader and the pipe's write end (for the caller to hand on and
    close)."""
    read_end, write_end = os.pipe()
    try:
        with log.open("wb") as sink:
            reader = procs.start(name, [*pinned(core), "cat"], stdin=read_end, stdout=sink.fileno())
    finally:
        os.close(read_end)
    return reader, write_end


def start_gateway(
    procs: Procs,
    tmp: Path,
    name: str,
    config: Path,
    port: int,
    access_log: bool = False,
    stdout: int | None = None,
    python: str | None = None,
) -> Child:
    """Start the gateway (under `python`, else `gateway_python()`) and wait until it answers;
    check that it admits the key and only it. Its stdout (the access log) goes to `stdout`, a
    file descriptor, or else to its log."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(GATEWAY_CHECKOUT), os.environ.get("PYTHONPATH")])
        ),
        "GATEWAY_ACCESS_LOG": "on" if access_log else "off",
    }
    env.pop("GATEWAY_REDIS_URL", None)  # the generated config decides the storage
    # One worker keeps its metrics in memory unless told to use shared files: measure that.
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    child = procs.start(name, gateway_argv(config, python=python), env=env, stdout=stdout)
    try:
        wait_until_serving(child, port)
        expect(port, "/bench/ok", KEY_HEADER, 200, f"{name} with the key")
        expect(port, "/bench/ok", {}, 401, f"{name} without a key")
    except Exception:
        procs.stop(child)
        raise
    return child


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def session_cpu_seconds(leader: int) -> float:
    """User + system CPU time of every live process in the session `leader` leads: a child of
    `Procs` with all the processes it forked (nginx's workers), each with all its threads."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # After the command name in parentheses: state, ppid, pgrp, session, ..., utime, stime.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == leader:
            total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def listeners(port: int) -> int:
    """How many sockets listen on TCP `port` (any address), from /proc/net/tcp and tcp6."""
    found = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found += 1
    return found


def read_access_log(path: Path) -> tuple[int, int]:
    """(lines, lines that are not one whole JSON object) of an access log file."""
    lines = broken = 0
    with path.open("rb") as file:
        for line in file:
            lines += 1
            try:
                json.loads(line)
            except ValueError:
                broken += 1
    return lines, broken
