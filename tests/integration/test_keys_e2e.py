"""Keys as data end to end: `gateway run` with two workers on Redis and on Redis Cluster.

A change made through the admin API (on whichever worker answers it) is honoured by both
workers within a second; API keys outlive a restart; and a flood of made-up keys sends not a
single command to Redis.
"""

from __future__ import annotations

import http.client
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.keys.store import CHECK_INTERVAL
from tests.support.config import server_yaml
from tests.support.operations import (
    ThreadedUpstream,
    call,
    requests_counted_by_worker,
    serving_workers,
    wait_for,
)
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisClusterNodes, RedisSentinelGroup, RedisServer
from tests.support.sockets import free_ports

HONOURED_WITHIN = 1.0
WORKERS = 2
# Requests on fresh connections after a change; the kernel spreads them over both workers.
SPREAD = 40
# The rotation's grace: it must outlast HONOURED_WITHIN and then 2 * SPREAD requests and two
# metrics reads, which took over a second on a 2-core machine running six CPU burners (2 s
# was seen to end before the last of them).
GRACE = 3.0

API = """
products:
  soccer:
    upstream: {{url: "{upstream}/base"}}
    routes: [{{path: "/soccer/{{rest:path}}"}}]
plans:
  trial: {{rate: {{limit: 1000, per: second}}}}
keys:
  - {{name: file-user, key: file-secret, plans: {{soccer: trial}}}}
"""


@dataclass
class Rig:
    gateway: GatewayProcess
    proxy_port: int
    admin_port: int
    workers: list[int]
    scratch: Path

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            payload = None if body is None else json.dumps(body)
            connection.request(method, path, body=payload)
            response = connection.getresponse()
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
        finally:
            connection.close()

    def proxy(self, secret: str) -> tuple[int, dict[str, Any] | None]:
        answer = call(self.proxy_port, "/soccer/x", headers={"X-API-Key": secret})
        body = json.loads(answer.body) if answer.status != 200 else None
        return answer.status, body

    def counted(self) -> list[float]:
        return [requests_counted_by_worker(pid, self.scratch) for pid in self.workers]

    def each_worker_has_counted(self) -> bool:
        """Whether each worker has its metrics file yet (made by its first counted request);
        sends one more request if not."""
        try:
            self.counted()
        except AssertionError:
            self.proxy("file-secret")
            return False
        return True

    def honoured_by_both_workers(self, secret: str, status: int, since: float) -> float:
        """Wait for `status` (at most a second after `since`); from `since` + 1 s on, every
        request on either worker gets it. Returns how long the first worker took."""
        first = wait_for(
            lambda: self.proxy(secret)[0] == status,
            HONOURED_WITHIN,
            f"{status} for the changed key",
        )
        assert first
        took = time.monotonic() - since
        time.sleep(max(0.0, since + HONOURED_WITHIN - time.monotonic()))
        before = self.counted()
        answers = [self.proxy(secret)[0] for _ in range(SPREAD)]
        after = self.counted()
        assert answers == [status] * SPREAD
        assert all(b > a for a, b in zip(before, after, strict=True)), (before, after)
        return took


Storage = RedisServer | RedisClusterNodes | RedisSentinelGroup


@pytest.fixture(params=["redis", "cluster", "sentinel"])
def storage(request: pytest.FixtureRequest) -> Storage:
    fixture = {"redis": "redis_server", "cluster": "redis_cluster"}.get(
        request.param, "redis_sentinel"
    )
    server: Storage = request.getfixturevalue(fixture)
    return server


@pytest.fixture
def rig(tmp_path: Path, storage: Storage) -> Iterator[Rig]:
    with ThreadedUpstream() as upstream:
        proxy_port, admin_port = free_ports(2)
        config = tmp_path / "config"
        config.mkdir()
        (config / "00-server.yaml").write_text(
            server_yaml(proxy_port, admin_port, storage.url, workers=WORKERS)
        )
        (config / "10-api.yaml").write_text(API.format(upstream=upstream.url))
        gateway = GatewayProcess(config)
        try:
            gateway.start(proxy_port, admin_port)
            workers = serving_workers(gateway, WORKERS)
            rig = Rig(gateway, proxy_port, admin_port, workers, tmp_path)
            wait_for(rig.each_worker_has_counted, 10, "a request counted by each worker")
            yield rig
        finally:
            # Well within the 30 s drain: nothing is in flight, so a slow stop is a hang.
            code, stderr = gateway.stop(timeout=15), gateway.stderr()
            gateway.close()
            assert code == 0, stderr


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def test_created_disabled_rotated_expired_deleted_on_both_workers(rig: Rig) -> None:
    name = unique("acme")
    since = time.monotonic()
    status, created = rig.admin("POST", "/admin/keys", {"name": name, "plans": {"soccer": "trial"}})
    assert status == 201, created
    secret = created["key"]
    took = rig.honoured_by_both_workers(secret, 200, since)
    assert took < HONOURED_WITHIN

    since = time.monotonic()
    assert rig.admin("PATCH", f"/admin/keys/{name}", {"disabled": True})[0] == 200
    rig.honoured_by_both_workers(secret, 403, since)
    assert rig.admin("PATCH", f"/admin/keys/{name}", {"disabled": False})[0] == 200

    # Rotation: the new secret works on both workers, and so does the old one, until the
    # grace ends; then only the new one.
    since = time.monotonic()
    status, rotated = rig.admin("POST", f"/admin/keys/{name}/rotate", {"grace": f"{GRACE:.0f}s"})
    assert status == 200
    new_secret = rotated["key"]
    rig.honoured_by_both_workers(new_secret, 200, since)
    before = rig.counted()
    old_answers = [rig.proxy(secret)[0] for _ in range(SPREAD)]
    late = time.monotonic() - since  # the grace began after `since`: it lasts past since + GRACE
    assert old_answers == [200] * SPREAD, f"{late:.2f} s after the rotation; grace {GRACE} s"
    assert all(b > a for a, b in zip(before, rig.counted(), strict=True))
    wait_for(lambda: rig.proxy(secret)[0] == 401, GRACE + 1.0, "old secret refused after the grace")
    rig.honoured_by_both_workers(secret, 401, time.monotonic() - HONOURED_WITHIN)
    rig.honoured_by_both_workers(new_secret, 200, time.monotonic() - HONOURED_WITHIN)

    since = time.monotonic()
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    assert rig.admin("PATCH", f"/admin/keys/{name}", {"expires": now})[0] == 200
    rig.honoured_by_both_workers(new_secret, 401, since)
    body = rig.proxy(new_secret)[1]
    assert body is not None and body["detail"].startswith(f"The API key '{name}' expired at ")

    assert rig.admin("PATCH", f"/admin/keys/{name}", {"expires": None})[0] == 200
    rig.honoured_by_both_workers(new_secret, 200, time.monotonic())
    since = time.monotonic()
    assert rig.admin("DELETE", f"/admin/keys/{name}")[0] == 204
    rig.honoured_by_both_workers(new_secret, 401, since)
    body = rig.proxy(new_secret)[1]
    assert body is not None and body["detail"] == "The API key is not valid."


def test_ending_a_grace_early_is_honoured_by_both_workers(rig: Rig) -> None:
    """`DELETE /admin/keys/NAME/previous`, answered by one worker, stops the key's old secrets
    on both within a second, the current one still served."""
    name = unique("leaked")
    status, created = rig.admin("POST", "/admin/keys", {"name": name, "plans": {"soccer": "trial"}})
    assert status == 201, created
    rotate = f"/admin/keys/{name}/rotate"
    old_secrets = [created["key"], rig.admin("POST", rotate, {"grace": "1h"})[1]["key"]]
    since = time.monotonic()
    status, rotated = rig.admin("POST", rotate, {"grace": "1h"})
    assert status == 200 and len(rotated["previous_keys_valid_until"]) == 2
    current = rotated["key"]
    rig.honoured_by_both_workers(current, 200, since)
    for old in old_secrets:
        rig.honoured_by_both_workers(old, 200, since)

    since = time.monotonic()
    status, ended = rig.admin("DELETE", f"/admin/keys/{name}/previous")
    assert status == 200 and ended["previous_keys_valid_until"] == [], ended
    took = rig.honoured_by_both_workers(old_secrets[0], 401, since)
    assert took < HONOURED_WITHIN
    rig.honoured_by_both_workers(old_secrets[1], 401, since)
    rig.honoured_by_both_workers(current, 200, since)
    for old in old_secrets:
        body = rig.proxy(old)[1]
        assert body is not None and body["detail"] == (
            f"The API key was replaced by a rotation; it was accepted until {ended['updated']}."
        )


def test_api_keys_are_still_there_after_a_restart(rig: Rig) -> None:
    name = unique("durable")
    status, created = rig.admin("POST", "/admin/keys", {"name": name, "plans": {"soccer": "trial"}})
    assert status == 201
    assert rig.gateway.stop() == 0, rig.gateway.stderr()

    rig.gateway.start(rig.proxy_port, rig.admin_port)
    assert rig.proxy(created["key"])[0] == 200  # served from the first request on
    status, fetched = rig.admin("GET", f"/admin/keys/{name}")
    assert status == 200 and fetched["source"] == "api"


def _redis_clients(storage: Storage) -> list[redis.Redis]:
    if isinstance(storage, RedisClusterNodes):
        servers = storage.nodes
    elif isinstance(storage, RedisSentinelGroup):
        servers = storage.servers
    else:
        servers = [storage]
    return [server.client() for server in servers]


def _command_calls(clients: list[redis.Redis]) -> dict[str, int]:
    """Commands run by all the servers, summed; a replica's DELs left out. A replica runs a DEL
    for each key that expires on its master (a rate window of an earlier request, say), which
    nobody sent: it counts it in its commandstats. Any DEL the gateway sent reached the master,
    which counts it."""
    totals: dict[str, int] = {}
    for client in clients:
        stats: dict[str, Any] = client.info("commandstats")
        replica = client.info("replication")["role"] == "slave"
        for command, figures in stats.items():
            if replica and command == "cmdstat_del":
                continue
            totals[command] = totals.get(command, 0) + int(figures["calls"])
    return totals


def test_made_up_keys_send_no_command_to_redis(rig: Rig, storage: Storage) -> None:
    clients = _redis_clients(storage)
    try:
        before = _command_calls(clients)
        started = time.monotonic()
        statuses = [rig.proxy(secrets.token_urlsafe(24))[0] for _ in range(200)]
        elapsed = time.monotonic() - started
        after = _command_calls(clients)
    finally:
        for client in clients:
            client.close()
    assert statuses == [401] * 200
    added = {
        command: after[command] - before.get(command, 0)
        for command in after
        if after[command] != before.get(command, 0)
    }
    # Only the key store's background version check (one MGET of the version and the epoch
    # every CHECK_INTERVAL per worker) and our own INFO calls run meanwhile; nothing scales
    # with the requests.
    version_checks = added.pop("cmdstat_mget", 0)
    assert version_checks <= WORKERS * (elapsed / CHECK_INTERVAL + 2)
    added.pop("cmdstat_info", None)
    if isinstance(storage, RedisSentinelGroup):
        # The Sentinels' own watch (PING, INFO, hello messages) and the replication link.
        for command in ("ping", "publish", "replconf", "subscribe"):
            added.pop(f"cmdstat_{command}", None)
    assert added == {}
