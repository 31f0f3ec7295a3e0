"""`make run`: the example upstream(s) the config points at, then the gateway in front.

Every upstream of the config on a loopback address gets an example upstream process on its
port; the gateway then runs in the foreground. Ctrl-C or SIGTERM stops both.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.config import ConfigError, load_config

HERE = Path(__file__).resolve().parent


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
    upstreams = [
        subprocess.Popen([sys.executable, str(HERE / "upstream.py"), "--port", str(port)])
        for port in ports
    ]
    for port in ports:
        print(f"example upstream on http://127.0.0.1:{port}", file=sys.stderr)
    time.sleep(0.3)
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", args.config])

    def stop(signum: int, _frame: object) -> None:
        gateway.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        code = gateway.wait()
    finally:
        for upstream in upstreams:
            upstream.terminate()
        for upstream in upstreams:
            upstream.wait(timeout=5)
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
