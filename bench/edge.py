"""HTTPS and WebSocket through the gateway, each next to its reference in the same run.

- **HTTPS requests per second**: wrk over keep-alive TLS connections (`-t1 -c50`) against nginx
  terminating TLS with `proxy_pass`, and against the gateway with `server.tls`; both use the
  same self-signed P-256 certificate (made with `openssl`) and the upstream nginx of `run.py`.
- **WebSocket messages per second**: an aiohttp WebSocket echo upstream, reached directly and
  through the gateway (a `websocket: true` route). The client keeps `--window` small binary
  messages in flight on each of `--sockets` WebSockets, writing pre-built masked frames and
  counting the echoes by their bytes, so the client costs little next to what it measures.

Proxies run on core 0; wrk, the client and the upstreams on core 1, as in `run.py`.

    .venv/bin/python bench/edge.py [--duration 10] [--rounds 3] [--quick] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from harness import (
    API_KEY,
    BenchError,
    GatewayPorts,
    Procs,
    bench_workspace,
    free_port,
    gateway_argv,
    pinned,
    raise_on_sigterm,
    require_tools,
    start_nginx,
    start_upstream,
    use_python,
    wait_until_serving,
    write_gateway_config,
)
from interpreter import fastest_python
from peers import default_peers_dir
from run import parse_wrk

PATH = "/bench/ok"
WS_PATH = "/live/echo"
PAYLOAD = b"m" * 64
MASK = b"\x01\x02\x03\x04"
NGINX_TLS = "HTTPS nginx (TLS, proxy_pass)"
GATEWAY_TLS = "HTTPS gateway (server.tls)"
WS_DIRECT = "WebSocket direct (aiohttp echo)"
WS_GATEWAY = "WebSocket gateway"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def gateway_config(
    tmp: Path, name: str, ports: GatewayPorts, upstream_port: int, **server: object
) -> Path:
    path = write_gateway_config(tmp / f"{name}.yaml", ports, "memory://", upstream_port)
    config = yaml.safe_load(path.read_text())
    config["server"].update(server)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_gateway(procs: Procs, name: str, config: Path, port: int) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "GATEWAY_ACCESS_LOG": "off",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    child = procs.start(name, gateway_argv(config), env=env)
    wait_until_serving(child, port)


def wrk_https(port: int, seconds: int, connections: int) -> float:
    argv = [
        *pinned(1), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
        "-H", f"X-API-Key: {API_KEY}", f"https://127.0.0.1:{port}{PATH}",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"wrk failed:\n{done.stdout}{done.stderr}")
    run = parse_wrk(done.stdout)
    if run.bad_responses:
        raise BenchError(f"wrk saw {run.bad_responses} bad answers from port {port}")
    return run.rps


# --- WebSocket ---------------------------------------------------------------------------

ECHO_UPSTREAM = """
import sys
from aiohttp import web

async def echo(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        await ws.send_bytes(message.data)
    return ws

app = web.Application()
app.router.add_get("/{tail:.*}", echo)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def _frame(payload: bytes) -> bytes:
    masked = bytes(byte ^ MASK[index % 4] for index, byte in enumerate(payload))
    return bytes([0x82, 0x80 | len(payload)]) + MASK + masked


async def _open_websocket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {WS_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"X-API-Key: {API_KEY}\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise BenchError(f"no WebSocket on port {port}: {head[:200]!r}")
    return reader, writer


async def _echo_loop(port: int, window: int, stop_at: float, counts: list[int]) -> None:
    reader, writer = await _open_websocket(port)
    frame = _frame(PAYLOAD)
    answer_size = 2 + len(PAYLOAD)
    writer.write(frame * window)
    echoed = 0
    pending = b""
    while time.monotonic() < stop_at:
        pending += await reader.read(65536)
        answers, rest = divmod(len(pending), answer_size)
        pending = pending[answers * answer_size :] if answers else pending
        if answers:
            echoed += answers
            writer.write(frame * answers)  # keep the window full
        del rest
    counts.append(echoed)
    writer.close()


async def _messages_per_second(port: int, sockets: int, window: int, seconds: float) -> float:
    counts: list[int] = []
    started = time.monotonic()
    await asyncio.gather(
        *(_echo_loop(port, window, started + seconds, counts) for _ in range(sockets))
    )
    return sum(counts) / (time.monotonic() - started)


def websocket_rate(port: int, sockets: int, window: int, seconds: float) -> float:
    # The client runs on core 1 in a child of its own, as wrk does.
    argv = [
        *pinned(1), sys.executable, __file__, "--client", str(port),
        "--sockets", str(sockets), "--window", str(window), "--duration", str(seconds),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"WebSocket client failed:\n{done.stdout}{done.stderr}")
    return float(done.stdout.strip())


# --- main --------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="HTTPS and WebSocket through the gateway.")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--sockets", type=int, default=10)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="one round of 3 s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def summary(name: str, values: list[float], unit: str) -> str:
    return (
        f"  {name:<34} {statistics.median(values):>10,.0f} {unit}"
        f"  (min {min(values):,.0f}, max {max(values):,.0f})"
    )


def main() -> int:
    args = parse_args()
    if args.client is not None:
        rate = asyncio.run(
            _messages_per_second(args.client, args.sockets, args.window, args.duration)
        )
        print(f"{rate:.1f}")
        return 0
    if args.quick:
        args.duration, args.rounds = 3, 1
    require_tools(["nginx", "wrk", "taskset"])
    raise_on_sigterm()
    python = fastest_python(default_peers_dir().parent, None)
    use_python(python.path)
    print(f"gateway's interpreter: {python.describe()}", flush=True)
    with bench_workspace("gateway-edge-", args.keep) as procs:
        tmp = procs.logs
        try:
            cert, key = make_certificate(tmp)
            upstream_port, nginx_tls_port, echo_port = free_port(), free_port(), free_port()
            start_upstream(procs, tmp, upstream_port)
            start_nginx(
                procs, tmp, "nginx-tls", "nginx-tls-proxy.conf.tmpl", 0,
                port=nginx_tls_port, upstream_port=upstream_port, cert=cert, key=key,
            )  # fmt: skip
            https_ports = GatewayPorts(free_port(), free_port())
            config = gateway_config(
                tmp,
                "gateway-tls",
                https_ports,
                upstream_port,
                tls={"cert": str(cert), "key": str(key)},
            )
            start_gateway(procs, "gateway-tls", config, https_ports.proxy)
            echo = procs.start(
                "echo", [*pinned(1), sys.executable, "-c", ECHO_UPSTREAM, str(echo_port)]
            )
            wait_until_serving(echo, echo_port)
            ws_ports = GatewayPorts(free_port(), free_port())
            ws_config = write_gateway_config(
                tmp / "gateway-ws.yaml", ws_ports, "memory://", echo_port
            )
            loaded = yaml.safe_load(ws_config.read_text())
            loaded["products"]["bench"]["routes"].append(
                {"path": "/live/{rest:path}", "websocket": True}
            )
            ws_config.write_text(yaml.safe_dump(loaded, sort_keys=False))
            start_gateway(procs, "gateway-ws", ws_config, ws_ports.proxy)

            results: dict[str, list[float]] = {}
            conns, sockets, window = args.connections, args.sockets, args.window
            targets = [
                (NGINX_TLS, lambda s: wrk_https(nginx_tls_port, s, conns)),
                (GATEWAY_TLS, lambda s: wrk_https(https_ports.proxy, s, conns)),
                (WS_DIRECT, lambda s: websocket_rate(echo_port, sockets, window, s)),
                (WS_GATEWAY, lambda s: websocket_rate(ws_ports.proxy, sockets, window, s)),
            ]
            for _ in range(args.rounds):
                for name, measure in targets:
                    measure(1)  # warm-up
                    results.setdefault(name, []).append(measure(args.duration))
            print(f"{args.rounds} round(s) of {args.duration} s; median (min, max)")
            for name, values in results.items():
                unit = "req/s" if name.startswith("HTTPS") else "msg/s"
                print(summary(name, values, unit))
            median = {name: statistics.median(values) for name, values in results.items()}
            https = median[GATEWAY_TLS] / median[NGINX_TLS]
            ws = median[WS_GATEWAY] / median[WS_DIRECT]
            print(f"  HTTPS gateway / nginx: {https:.2f}; WebSocket gateway / direct: {ws:.2f}")
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
