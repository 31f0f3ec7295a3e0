"""Many keys: start time, memory per process, `gateway check`, and requests during a reload.

    .venv/bin/python bench/keys.py                   # 10,000 and 100,000 keys, 2 workers + Redis
    .venv/bin/python bench/keys.py --sizes 10000 --workers 1

For each size it writes a config of that many keys (in keys.yaml) and prints:
- `gateway check`: wall time and peak RSS of the check;
- start: from `gateway run` to the first 200 for a key of the file, and the RSS of every
  gateway process then (the supervisor and each worker);
- with keys from the admin API (`POST /admin/keys`) instead of the file: the same start
  figures after a restart; skipped, saying so, where the admin API has no keys endpoint. Then
  every process's subscription to key changes is dropped (CLIENT KILL TYPE pubsub, as a
  network blip would) and a key is created and another deleted, under a probe: how long until
  every process honours both, catching up from the storage's log of changes, and again with
  that log gone, reading every key.
For the smallest size, a probe sends a request every 20 ms while keys.yaml is edited (one key
added): the worst probe latency around the reload (the goal is under 100 ms) and how long after
the edit the new key answered 200.

The upstream is nginx and the storage a redis-server of this run (see harness.py).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
import yaml
from harness import (
    REPO,
    BenchError,
    Child,
    Procs,
    bench_workspace,
    free_port,
    raise_on_sigterm,
    require_tools,
    rss_kib,
    start_redis,
    start_upstream,
    wait_until_serving,
)

PROBE_KEY = "probe-key"
PROBE_PATH = "/bench/ok"
PROBE_INTERVAL = 0.02


@dataclass(frozen=True)
class Setup:
    directory: Path
    proxy_port: int
    admin_port: int
    workers: int
    redis_url: str
    upstream_port: int


def secret(index: int) -> str:
    return f"bench-secret-{index}"


def write_config(setup: Setup, keys: int) -> None:
    """gateway.yaml (server, storage, products, plans) and keys.yaml with `keys` keys."""
    setup.directory.mkdir(parents=True, exist_ok=True)
    base = {
        "server": {
            "listen": f"127.0.0.1:{setup.proxy_port}",
            "admin_listen": f"127.0.0.1:{setup.admin_port}",
            "workers": setup.workers,
        },
        "storage": {"url": setup.redis_url},
        "products": {
            "bench": {
                "upstream": {"url": f"http://127.0.0.1:{setup.upstream_port}"},
                "routes": [{"path": "/bench/{rest:path}"}],
            }
        },
        "plans": {
            "free": {"rate": {"limit": 1000, "per": "second"}},
            "paid": {"rate": {"limit": 100_000, "per": "second"}},
        },
    }
    (setup.directory / "gateway.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    write_keys(setup.directory / "keys.yaml", keys)


def write_keys(path: Path, keys: int, extra: str = "") -> None:
    """Written the way people write them (block style), the probe's key first."""
    lines = ["keys:", f"  - {{name: probe, key: {PROBE_KEY}, plans: {{bench: paid}}}}"]
    for index in range(keys):
        digest = hashlib.sha256(secret(index).encode()).hexdigest()
        lines += [
            f"  - name: customer-{index:06d}",
            f"    key_sha256: {digest}",
            f"    plans: {{bench: {'paid' if index % 10 == 0 else 'free'}}}",
        ]
    if extra:
        lines.append(extra)
    partial = path.with_suffix(".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(path)  # the gateway sees the old file or the new one


def gateway_env() -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "GATEWAY_ACCESS_LOG": "off",
    }
    env.pop("GATEWAY_REDIS_URL", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def run_check(directory: Path) -> tuple[float, float]:
    """`gateway check`: seconds and peak RSS in MiB."""
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-m", "gateway", "check", "--config", str(directory)],
        env=gateway_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.monotonic() - started
    output = child.stdout.read().decode() if child.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise BenchError(f"gateway check failed: {output[:2000]}")
    return elapsed, usage.ru_maxrss / 1024


def get(port: int, path: str, key: str | None, timeout: float = 5.0) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"X-API-Key": key} if key else {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (the workers of a supervisor), not the config reader's."""
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pids
    for child in children:
        command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"gateway.config" not in command:
            pids.append(int(child))
    return pids


@dataclass
class Start:
    seconds: float
    rss_mib: dict[int, float] = field(default_factory=dict)


def start_gateway(procs: Procs, setup: Setup, name: str, key: str) -> tuple[Child, Start]:
    """Run the gateway; time until `key` answers 200 on the proxy port."""
    argv = [sys.executable, "-m", "gateway", "run", "--config", str(setup.directory)]
    started = time.monotonic()
    child = procs.start(name, argv, env=gateway_env())
    wait_until_serving(child, setup.proxy_port, timeout=120)
    deadline = time.monotonic() + 60
    while True:
        try:
            if get(setup.proxy_port, PROBE_PATH, key) == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{name}: the key never answered 200:\n{child.tail()}")
        time.sleep(0.02)
    seconds = time.monotonic() - started
    if setup.workers > 1:
        # Every worker must be up, not just the first to answer.
        while len(process_tree(child.popen.pid)) < setup.workers + 1:
            time.sleep(0.02)
    rss = {pid: rss_kib(pid) / 1024 for pid in process_tree(child.popen.pid)}
    return child, Start(seconds, rss)


class Probe(threading.Thread):
    """A request every 20 ms on one keep-alive connection; records each latency."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[tuple[float, float, int]] = []  # (sent at, seconds, status)
        self.stopping = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        next_at = time.monotonic()
        while not self.stopping.is_set():
            sent = time.monotonic()
            try:
                connection.request("GET", PROBE_PATH, headers={"X-API-Key": PROBE_KEY})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                status = 0
            self.samples.append((sent, time.monotonic() - sent, status))
            next_at += PROBE_INTERVAL
            time.sleep(max(0.0, next_at - time.monotonic()))
        connection.close()


@dataclass
class ReloadResult:
    applied_after: float
    worst_ms: float
    median_ms: float
    probes: int
    failed: int


def reload_under_probe(setup: Setup, keys: int) -> ReloadResult:
    """Edit keys.yaml (one key more) while probing; wait for the new key to answer."""
    probe = Probe(setup.proxy_port)
    probe.start()
    time.sleep(1.0)  # a baseline before the edit
    new_key = "added-by-the-reload"
    extra = f"  - {{name: added, key: {new_key}, plans: {{bench: free}}}}"
    edited = time.monotonic()
    write_keys(setup.directory / "keys.yaml", keys, extra)
    deadline = edited + 30
    while get(setup.proxy_port, PROBE_PATH, new_key) != 200:
        if time.monotonic() > deadline:
            raise BenchError("the reloaded key never answered")
        time.sleep(0.01)
    applied = time.monotonic() - edited
    time.sleep(1.0)
    probe.stopping.set()
    probe.join()
    latencies = sorted(seconds for _, seconds, _ in probe.samples)
    return ReloadResult(
        applied_after=applied,
        worst_ms=latencies[-1] * 1000,
        median_ms=latencies[len(latencies) // 2] * 1000,
        probes=len(latencies),
        failed=sum(1 for _, _, status in probe.samples if status != 200),
    )


def create_api_keys(setup: Setup, keys: int) -> float | None:
    """POST /admin/keys `keys` times; seconds taken, or None without a keys API."""
    connection = http.client.HTTPConnection("127.0.0.1", setup.admin_port, timeout=30)
    started = time.monotonic()
    try:
        for index in range(keys):
            digest = hashlib.sha256(f"api-{secret(index)}".encode()).hexdigest()
            body = json.dumps(
                {"name": f"api-{index:06d}", "key_sha256": digest, "plans": {"bench": "free"}}
            )
            connection.request(
                "POST", "/admin/keys", body, headers={"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            text = response.read()
            if response.status == 404 and index == 0:
                return None
            if response.status not in (200, 201, 409):
                raise BenchError(f"POST /admin/keys: {response.status} {text[:300]!r}")
    finally:
        connection.close()
    return time.monotonic() - started


@dataclass
class FollowResult:
    honoured_after: float  # the new key answered 200 and the deleted one 401
    worst_ms: float
    median_ms: float
    probes: int


def follow_under_probe(setup: Setup, keys: int, full_read: bool) -> FollowResult:
    """Drop every gateway process's subscription to the key changes (as a network blip
    would), then create a key and delete another through the admin API while probing: how
    long until every process honours both. With `full_read`, the log of recent changes is
    deleted right after, so the processes read every key again instead of catching up."""
    store = redis.Redis.from_url(setup.redis_url)
    probe = Probe(setup.proxy_port)
    probe.start()
    admin = http.client.HTTPConnection("127.0.0.1", setup.admin_port, timeout=30)
    try:
        time.sleep(1.0)  # a baseline
        tag = "full" if full_read else "catch-up"
        new_secret, doomed = f"followed-{tag}", f"api-{keys - 2 if full_read else keys - 3:06d}"
        doomed_secret = f"api-{secret(keys - 2 if full_read else keys - 3)}"
        if get(setup.proxy_port, PROBE_PATH, doomed_secret) != 200:
            raise BenchError(f"{doomed} does not answer before its deletion")
        store.client_kill_filter(_type="pubsub")
        changed = time.monotonic()
        digest = hashlib.sha256(new_secret.encode()).hexdigest()
        body = json.dumps(
            {"name": f"followed-{tag}", "key_sha256": digest, "plans": {"bench": "free"}}
        )
        for method, path, payload in (
            ("POST", "/admin/keys", body),
            ("DELETE", f"/admin/keys/{doomed}", None),
        ):
            admin.request(method, path, payload, headers={"Content-Type": "application/json"})
            response = admin.getresponse()
            response.read()
            if response.status not in (201, 204):
                raise BenchError(f"{method} {path}: {response.status}")
        if full_read:
            # Gone before the processes subscribe again (0.1 s after losing it), as if trimmed.
            store.delete("gw:{gw:keys}:log")
        deadline = changed + 60
        # Both honoured ten times in a row, each on a new connection that the kernel gives to
        # any worker: then every worker has them, all but surely; timed to the first of ten.
        streak, first = 0, 0.0
        while streak < 10:
            if time.monotonic() > deadline:
                raise BenchError("the changes were never honoured")
            if (
                get(setup.proxy_port, PROBE_PATH, new_secret) == 200
                and get(setup.proxy_port, PROBE_PATH, doomed_secret) == 401
            ):
                first = first if streak else time.monotonic()
                streak += 1
            else:
                streak = 0
                time.sleep(0.01)
        honoured = first - changed
        time.sleep(1.0)
    finally:
        admin.close()
        store.close()
        probe.stopping.set()
        probe.join()
    latencies = sorted(seconds for _, seconds, _ in probe.samples)
    return FollowResult(
        honoured, latencies[-1] * 1000, latencies[len(latencies) // 2] * 1000, len(latencies)
    )


def show_start(label: str, start: Start) -> None:
    per_process = ", ".join(f"{rss:.0f}" for rss in start.rss_mib.values())
    print(f"  {label}: {start.seconds:.1f} s to the first 200; RSS MiB per process: {per_process}")


def bench_size(procs: Procs, base: Setup, keys: int, probe_reload: bool, api: bool) -> None:
    setup = Setup(
        base.directory / f"keys-{keys}",
        free_port(),
        free_port(),
        base.workers,
        base.redis_url,
        base.upstream_port,
    )
    write_config(setup, keys)
    size_mib = (setup.directory / "keys.yaml").stat().st_size / 2**20
    print(f"{keys:,} keys (keys.yaml {size_mib:.1f} MiB), {setup.workers} worker(s):", flush=True)
    seconds, peak = run_check(setup.directory)
    print(f"  gateway check: {seconds:.1f} s, peak RSS {peak:.0f} MiB", flush=True)
    child, start = start_gateway(procs, setup, f"gateway-{keys}", PROBE_KEY)
    show_start("start, keys from the file", start)
    try:
        if probe_reload:
            result = reload_under_probe(setup, keys)
            print(
                f"  reload of the {keys:,}-key file under a probe every 20 ms: new key served "
                f"{result.applied_after:.2f} s after the edit; probe latency worst "
                f"{result.worst_ms:.1f} ms, median {result.median_ms:.1f} ms "
                f"({result.probes} probes, {result.failed} not 200)",
                flush=True,
            )
        created = create_api_keys(setup, keys) if api else None
    finally:
        procs.stop(child)
    if not api:
        return
    if created is None:
        print("  keys from the API: skipped (POST /admin/keys answered 404: no keys API here)")
        return
    print(f"  {keys:,} keys created through POST /admin/keys in {created:.1f} s")
    write_keys(setup.directory / "keys.yaml", 0)  # only the probe's key left in the file
    # Timed to the first 200 for the last key created: every API key is loaded by then.
    last = f"api-{secret(keys - 1)}"
    child, start = start_gateway(procs, setup, f"gateway-{keys}-api", last)
    try:
        show_start("start, keys from the API", start)
        for full_read in (False, True):
            followed = follow_under_probe(setup, keys, full_read)
            how = "a full read (no log of changes)" if full_read else "catching up from the log"
            print(
                f"  subscriptions dropped, then a key created and one deleted, {how}: honoured by "
                f"every process after {followed.honoured_after:.2f} s; probe latency worst "
                f"{followed.worst_ms:.1f} ms, median {followed.median_ms:.1f} ms "
                f"({followed.probes} probes)",
                flush=True,
            )
    finally:
        procs.stop(child)


def main() -> int:
    parser = argparse.ArgumentParser(description="Start, memory and reloads with many keys.")
    parser.add_argument("--sizes", default="10000,100000", help="key counts (10000,100000)")
    parser.add_argument("--workers", type=int, default=2, help="gateway workers (2)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    parser.add_argument("--no-api", action="store_true", help="skip the keys made through the API")
    parser.add_argument(
        "--reload-probe-all", action="store_true", help="probe a reload at every size"
    )
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    require_tools(["nginx", "redis-server"])
    raise_on_sigterm()
    load = ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"load average at start: {load} on {os.cpu_count()} CPUs", flush=True)
    with bench_workspace("gateway-bench-keys-", args.keep) as procs:
        tmp = procs.logs
        try:
            upstream_port, redis_port = free_port(), free_port()
            start_upstream(procs, tmp, upstream_port)
            start_redis(procs, tmp, redis_port)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            base = Setup(tmp, 0, 0, args.workers, redis_url, upstream_port)
            for keys in sizes:
                probe = args.reload_probe_all or keys == sizes[0]
                bench_size(procs, base, keys, probe_reload=probe, api=not args.no_api)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
