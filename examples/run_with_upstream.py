"""`make run`: the example upstream(s) the config points at, then the gateway in front.

Every upstream of the config on a loopback address gets an example upstream process on its
port; the gateway then runs in the foreground, once every example upstream accepts
connections. An example upstream that cannot start (its port taken, say by a `make run` still
running elsewhere) stops it all with a message and exit status 1, rather than a gateway in
front of whatever holds that port. Ctrl-C or SIGTERM stops both.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from gateway.config import ConfigError, load_config

HERE = Path(__file__).resolve().parent
# How long an example upstream may take to accept connections: a Python process importing
# aiohttp takes well under a second, more on a busy machine.
UPSTREAM_START = 15.0


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until_up(upstreams: dict[int, subprocess.Popen[bytes]]) -> str | None:
    """None once every example upstream accepts connections, else why not."""
    deadline = time.monotonic() + UPSTREAM_START
    waiting = dict(upstreams)
    while waiting:
        for port, process in list(waiting.items()):
            if process.poll() is not None:
                return f"the example upstream for port {port} exited (is the port in use?)"
            if accepts(port):
                del waiting[port]
        if waiting and time.monotonic() > deadline:
            return f"the example upstream for port {min(waiting)} did not start in time"
        time.sleep(0.05)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="config")
    args = parser.parse_args()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    ports = sorted(
        {
            product.upstream.port
            for product in config.products.values()
            if product.upstream.host in ("127.0.0.1", "localhost")
        }
    )
    taken = [port for port in ports if accepts(port)]
    if taken:
        print(
            f"port {taken[0]} is in use: the example upstream cannot listen there "
            "(another `make run`?)",
            file=sys.stderr,
        )
        return 1
    upstreams = {
        port: subprocess.Popen([sys.executable, str(HERE / "upstream.py"), "--port", str(port)])
        for port in ports
    }
    failure = wait_until_up(upstreams)
    if failure is not None:
        print(failure, file=sys.stderr)
        stop_all(upstreams.values())
        return 1
    for port in ports:
        print(f"example upstream on http://127.0.0.1:{port}", file=sys.stderr)
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", args.config])

    def stop(signum: int, _frame: object) -> None:
        gateway.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        code = gateway.wait()
    finally:
        stop_all(upstreams.values())
    return code


def stop_all(processes: Iterable[subprocess.Popen[bytes]]) -> None:
    running = list(processes)
    for process in running:
        if process.poll() is None:
            process.terminate()
    for process in running:
        process.wait(timeout=5)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
