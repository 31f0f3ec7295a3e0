"""A `gateway run` worker on a Redis Cluster killed (SIGKILL) right after it answered the first
request of a subscription's day: the billing export must still list that day.

On a cluster the hit script cannot write the sets the export reads (they live in other slots
than the subscription's counts), so the worker writes them itself. Written after the hit's
reply, a worker killed in between left the day's requests counted but out of the export.

The kill lands in that window for certain: the master that holds `gw:subs:since` is frozen
(SIGSTOP) for the request, and a worker writes the sets after the reply only once it has read
that key (a fresh worker has not). The sets themselves, the subscription's counts and its
key's set are on the other masters, which answer throughout.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import RedisCluster, key_slot

from gateway.limits.base import day_of, day_text
from gateway.limits.redis_layout import day_key, rate_key
from gateway.limits.redis_registry import SINCE_KEY, day_set, key_set
from tests.support.config import write_config
from tests.support.operations import ThreadedUpstream, call
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisClusterNodes
from tests.support.sockets import free_ports

API = """
products:
  soccer:
    upstream: {{url: "{upstream}/base"}}
    routes: [{{path: "/soccer/{{rest:path}}"}}]
plans:
  billing: {{quota: {{limit: 100, per: month}}}}
keys:
  - {{name: {name}, key: {secret}, plans: {{soccer: billing}}}}
"""

# A generous storage timeout: the worker's first calls each open a connection to a master.
SERVER = """
server:
  listen: 127.0.0.1:{proxy_port}
  admin_listen: 127.0.0.1:{admin_port}
  workers: 1
storage:
  url: {storage_url}
  timeout: 2s
  on_error: deny
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    """A cluster of this test alone (one of its masters is frozen, a slot moved); its other
    masters serve while one does not answer."""
    nodes = RedisClusterNodes(tmp_path / "cluster", 3, "--cluster-require-full-coverage", "no")
    nodes.start()
    yield nodes
    nodes.stop()


def owner(cluster: RedisClusterNodes, key: str, moved: dict[int, int]) -> int:
    slot = key_slot(key.encode())
    return moved.get(slot, cluster.owner_of(slot))


def test_a_worker_killed_after_the_days_first_answer_leaves_the_day_in_the_export(
    tmp_path: Path, cluster: RedisClusterNodes
) -> None:
    # The day the worker will count the request in, and the next (a run across midnight UTC).
    first_day = day_of(time.time())
    days = (first_day, first_day + 1)
    moved: dict[int, int] = {}
    # `gw:subs:since` on a master that holds neither day's set, so that freezing it stops
    # nothing but the write after the reply.
    since_slot = key_slot(SINCE_KEY.encode())
    holding_days = {owner(cluster, day_set(day), moved) for day in days}
    frozen = owner(cluster, SINCE_KEY, moved)
    if frozen in holding_days:
        target = next(node for node in range(3) if node not in holding_days)
        cluster.move_slot(since_slot, frozen, target)
        moved[since_slot], frozen = target, target
    # A key whose subscription and key set are on masters that answer.
    name = next(
        candidate
        for candidate in (f"killed-{uuid.uuid4().hex[:8]}" for _ in range(1000))
        if frozen
        not in (
            owner(cluster, rate_key(f"{candidate}:soccer"), moved),
            owner(cluster, key_set(candidate), moved),
        )
    )
    secret = f"secret-{name}"
    with ThreadedUpstream() as upstream:
        api = API.format(upstream=upstream.url, name=name, secret=secret)
        killed = start_gateway(tmp_path / "killed", api, cluster.url)
        try:
            cluster.nodes[frozen].pause()
            try:
                answer = call(killed.proxy_port, "/soccer/x", headers={"X-API-Key": secret})
                killed.signal(signal.SIGKILL)  # one worker: the process is the worker
            finally:
                cluster.nodes[frozen].resume()
        finally:
            killed.close()
        assert answer.status == 200, answer
        last_day = day_of(time.time())

        # The day's counts hold the request, whatever the export says.
        inspector = RedisCluster(host="127.0.0.1", port=cluster.port, socket_timeout=5)
        try:
            counted = {
                day: inspector.hget(day_key(f"{name}:soccer", day), "r:billing")
                for day in range(first_day, last_day + 1)
            }
        finally:
            inspector.close()
        (day,) = (day for day, requests in counted.items() if requests == b"1")

        # Another gateway's export, which never saw the request.
        reader = start_gateway(tmp_path / "reader", api, cluster.url)
        try:
            path = f"/admin/usage.csv?from={day_text(first_day)}&to={day_text(last_day)}"
            exported = call(reader.admin_port, path)
        finally:
            reader.close()
    assert exported.status == 200, exported
    lines = [line for line in exported.body.decode().splitlines() if f",{name}," in line]
    assert lines == [f"{day_text(day)},{name},soccer,billing,1,1"]


def start_gateway(directory: Path, api: str, storage_url: str) -> GatewayProcess:
    proxy_port, admin_port = free_ports(2)
    server = SERVER.format(proxy_port=proxy_port, admin_port=admin_port, storage_url=storage_url)
    gateway = GatewayProcess(write_config(directory, api, server=server))
    try:
        gateway.start(proxy_port, admin_port)
    except BaseException:
        gateway.close()
        raise
    return gateway
