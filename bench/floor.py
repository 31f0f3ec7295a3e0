"""The floor: how fast a bare Python relay can be on this machine, next to nginx and the gateway.

    .venv/bin/python bench/floor.py [--duration 4] [--rounds 3]

The relay (`--serve-relay PORT UPSTREAM_PORT`, started by this script under the interpreter
the gateway runs under, chosen as bench/run.py chooses it) is the least a Python proxy on the
gateway's stack must do per request: httptools parses the request, the head is written to a
keep-alive upstream connection, httptools parses the answer, and the answer is written back,
all from protocol callbacks under uvloop, with no task, no routing, no key, no limit, no log.
Whatever the gateway does on top of that costs more; so the relay's ratio to
nginx bounds the ratio any Python gateway on this stack can reach here. Each round measures
nginx proxy_pass, the relay and the gateway as it ships (Redis storage, access log on to a
pipe), on core 0, with wrk, the upstream and Redis on core 1; medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
from collections import deque

from harness import (
    KEY_HEADER,
    GatewayPorts,
    bench_workspace,
    free_port,
    pinned,
    session_cpu_seconds,
    start_gateway,
    start_log_reader,
    start_nginx_proxy,
    start_redis,
    start_upstream,
    use_python,
    wait_until_serving,
    write_gateway_config,
)
from interpreter import fastest_python
from peers import default_peers_dir
from run import parse_wrk


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; answers go to the client that asked."""

    def __init__(self, pool: list[_Upstream]) -> None:
        import httptools

        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: _Client | None = None
        self.lines: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.lines, self.body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"connection", b"keep-alive"):
            self.lines.append(name + b": " + value)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        status = self.parser.get_status_code()
        head = b"HTTP/1.1 %d OK\r\n" % status + b"\r\n".join(self.lines) + b"\r\n\r\n"
        self.pool.append(self)
        if client is not None and client.transport is not None:
            client.transport.write(head + b"".join(self.body))


class _Client(asyncio.Protocol):
    def __init__(self, relay: _Relay) -> None:
        import httptools

        self.relay = relay
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.lines: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.lines = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.lines.append(name + b": " + value)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        head = method + b" " + self.url + b" HTTP/1.1\r\n" + b"\r\n".join(self.lines) + b"\r\n\r\n"
        self.relay.send(self, head)


class _Relay:
    def __init__(self, loop: asyncio.AbstractEventLoop, upstream_port: int) -> None:
        self.loop = loop
        self.upstream_port = upstream_port
        self.idle: list[_Upstream] = []
        self.waiting: deque[tuple[_Client, bytes]] = deque()

    def send(self, client: _Client, head: bytes) -> None:
        if self.idle:
            upstream = self.idle.pop()
            upstream.client = client
            assert upstream.transport is not None
            upstream.transport.write(head)
        else:
            self.loop.create_task(self._connect_and_send(client, head))

    async def _connect_and_send(self, client: _Client, head: bytes) -> None:
        upstream = _Upstream(self.idle)
        await self.loop.create_connection(lambda: upstream, "127.0.0.1", self.upstream_port)
        upstream.client = client
        assert upstream.transport is not None
        upstream.transport.write(head)


def serve_relay(port: int, upstream_port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        relay = _Relay(loop, upstream_port)
        server = await loop.create_server(lambda: _Client(relay), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def _measure(pid: int, url: str, seconds: float, headers: list[str]) -> tuple[float, float]:
    """(req/s, CPU µs per request of the process tree led by `pid`) over one wrk run."""
    argv = [*pinned(1), "wrk", "-t1", "-c50", *headers, url]
    subprocess.run([*argv, "-d1s"], capture_output=True, check=True)  # warm-up
    before = session_cpu_seconds(pid)
    done = subprocess.run([*argv, f"-d{seconds:g}s"], capture_output=True, text=True, check=True)
    run = parse_wrk(done.stdout, session_cpu_seconds(pid) - before)
    assert run.cpu_us is not None
    return run.requests / seconds, run.cpu_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--python", help="the Python to run the relay and the gateway under")
    parser.add_argument("--serve-relay", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_relay:
        serve_relay(*args.serve_relay)
        return
    # The relay and the gateway under the same interpreter, chosen as bench/run.py chooses.
    python = fastest_python(default_peers_dir().parent, args.python)
    use_python(python.path)
    print(f"interpreter: {python.describe()}", flush=True)
    results: dict[str, list[tuple[float, float]]] = {"nginx": [], "relay": [], "gateway": []}
    key = [arg for name, value in KEY_HEADER.items() for arg in ("-H", f"{name}: {value}")]
    relay_argv = [*pinned(0), python.path, __file__, "--serve-relay"]
    with bench_workspace("gateway-floor-") as procs:
        tmp = procs.logs
        upstream_port, redis_port = free_port(), free_port()
        start_upstream(procs, tmp, upstream_port)
        start_redis(procs, tmp, redis_port)
        for round_no in range(args.rounds):
            nginx_port = free_port()
            nginx = start_nginx_proxy(procs, tmp, nginx_port, upstream_port)
            url = f"http://127.0.0.1:{nginx_port}/bench/ok"
            results["nginx"].append(_measure(nginx.popen.pid, url, args.duration, []))
            procs.stop(nginx)

            relay_port = free_port()
            ports_argv = [str(relay_port), str(upstream_port)]
            relay = procs.start(f"relay{round_no}", relay_argv + ports_argv)
            wait_until_serving(relay, relay_port)
            url = f"http://127.0.0.1:{relay_port}/bench/ok"
            results["relay"].append(_measure(relay.popen.pid, url, args.duration, []))
            procs.stop(relay)

            ports = GatewayPorts(free_port(), free_port())
            storage = f"redis://127.0.0.1:{redis_port}"
            config = write_gateway_config(
                tmp / f"gateway{round_no}.yaml", ports, storage, upstream_port
            )
            reader, log_fd = start_log_reader(procs, f"log{round_no}", tmp / f"log{round_no}")
            gateway = start_gateway(
                procs,
                tmp,
                f"gateway{round_no}",
                config,
                ports.proxy,
                access_log=True,
                stdout=log_fd,
            )
            os.close(log_fd)
            url = f"http://127.0.0.1:{ports.proxy}/bench/ok"
            results["gateway"].append(_measure(gateway.popen.pid, url, args.duration, key))
            procs.stop(gateway)
            procs.stop(reader)
    nginx_rate = statistics.median(rate for rate, _ in results["nginx"])
    print(f"{'target':<28}{'req/s':>10}{'CPU µs/req':>12}{'to nginx':>10}")
    labels = {
        "nginx": "nginx proxy_pass",
        "relay": "bare Python relay (floor)",
        "gateway": "gateway, shipped defaults",
    }
    for name, label in labels.items():
        rate = statistics.median(r for r, _ in results[name])
        cpu = statistics.median(c for _, c in results[name])
        print(f"{label:<28}{rate:>10,.0f}{cpu:>12.1f}{rate / nginx_rate:>10.2f}")


if __name__ == "__main__":
    main()
