"""What users live through when Redis goes away and comes back, with `gateway run` (two
workers) under steady traffic: Redis killed (SIGKILL) and restarted empty on the same port,
one gateway cut off from a Redis that another gateway still writes to, and a Sentinel
failover.

Clients keep asking with a file key and an API key, each request on a new connection (the
kernel spreads them over both workers), every answer timed; meanwhile the admin API is called.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py

from gateway.keys.redis import CHANNEL
from tests.support.config import server_yaml
from tests.support.cuttable_relay import CuttableRelay
from tests.support.operations import ThreadedUpstream, call, scrape, serving_workers, wait_for
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisSentinelGroup, RedisServer
from tests.support.sockets import free_ports

STORAGE_TIMEOUT = 0.25
# What an answer may take beyond the storage timeout on a busy 2-core machine, the client
# threads, two workers and the upstream sharing it.
LATENCY_MARGIN = 0.5
OUTAGE_SECONDS = 1.0
RATE = 20  # per second, shared by both workers through Redis

API = """
products:
  soccer:
    upstream: {{url: "{upstream}/base"}}
    routes: [{{path: "/soccer/{{rest:path}}"}}]
plans:
  trial: {{rate: {{limit: {rate}, per: second}}, quota: {{limit: 1000000, per: day}}}}
keys:
  - {{name: file-user, key: file-secret, plans: {{soccer: trial}}}}
"""


@dataclass(frozen=True, slots=True)
class Timed:
    secret: str
    sent: float
    answered: float
    status: int
    code: str | None
    retry_after: str | None
    rate_limit: str | None  # X-RateLimit-Limit: the shared limit, or a worker's own share

    @property
    def latency(self) -> float:
        return self.answered - self.sent


@dataclass
class Traffic:
    """One client per secret, asking every 20 ms until stopped."""

    proxy_port: int
    secrets: tuple[str, ...]
    answers: list[Timed] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        for secret in self.secrets:
            thread = threading.Thread(target=self._ask, args=(secret,))
            self._threads.append(thread)
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _ask(self, secret: str) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                answer = call(self.proxy_port, "/soccer/x", headers={"X-API-Key": secret})
            except OSError as exc:  # a hang past the client's 5 s, or a refused connection
                self.errors.append(repr(exc))
                continue
            self.answers.append(
                Timed(
                    secret,
                    sent,
                    time.monotonic(),
                    answer.status,
                    answer.code,
                    answer.headers.get("Retry-After"),
                    answer.headers.get("X-RateLimit-Limit"),
                )
            )
            time.sleep(0.02)

    def sent_between(self, start: float, end: float, secret: str | None = None) -> list[Timed]:
        return [
            a
            for a in self.answers
            if start <= a.sent and a.answered < end and secret in (None, a.secret)
        ]


def admin(port: int, method: str, path: str, body: Any = None) -> tuple[int, str, Any]:
    """Status, content type and JSON body (None if empty) of one admin call."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body))
        response = connection.getresponse()
        raw = response.read()
        return response.status, response.getheader("Content-Type") or "", json.loads(raw or "null")
    finally:
        connection.close()


@dataclass
class Gateway:
    process: GatewayProcess
    proxy_port: int
    admin_port: int


@pytest.fixture
def upstream_url() -> Iterator[str]:
    with ThreadedUpstream() as upstream:
        yield upstream.url


def start_gateway(directory: Path, upstream_url: str, storage_url: str, on_error: str) -> Gateway:
    proxy_port, admin_port = free_ports(2)
    directory.mkdir()
    server = server_yaml(proxy_port, admin_port, storage_url, workers=2)
    (directory / "00-server.yaml").write_text(server.replace("deny", on_error))
    (directory / "10-api.yaml").write_text(API.format(upstream=upstream_url, rate=RATE))
    process = GatewayProcess(directory)
    try:
        process.start(proxy_port, admin_port)
        serving_workers(process, 2)
    except BaseException:
        process.close()
        raise
    return Gateway(process, proxy_port, admin_port)


def stop_gateway(gateway: Gateway) -> str:
    """Stop it (exit 0 asserted); its stderr."""
    code, stderr = gateway.process.stop(timeout=15), gateway.process.stderr()
    gateway.process.close()
    assert code == 0, stderr
    return stderr


# Admin calls that need the storage, each answered 503 storage_unavailable while it is away.
STORAGE_CALLS = [
    ("POST", "/admin/keys", {"name": "made-during", "plans": {"soccer": "trial"}}),
    ("POST", "/admin/usage/file-user/soccer/credit", {"amount": 5}),
    ("GET", "/admin/usage/file-user", None),
    ("GET", "/admin/usage/file-user/history?from=2026-01-01&to=2026-01-31", None),
    ("GET", "/admin/usage.csv?from=2026-01-01&to=2026-01-31", None),
    ("DELETE", "/admin/usage/file-user/soccer", None),
    ("GET", "/admin/keys/api-user", None),
    ("PATCH", "/admin/keys/api-user", {"disabled": True}),
    ("POST", "/admin/keys/api-user/rotate", {}),
    ("DELETE", "/admin/keys/api-user", None),
    ("GET", "/readyz", None),
]


@pytest.mark.parametrize("on_error", ["deny", "local"])
def test_redis_killed_and_restarted_empty_under_traffic(
    tmp_path: Path, upstream_url: str, fresh_redis_server: RedisServer, on_error: str
) -> None:
    redis = fresh_redis_server
    gateway = start_gateway(tmp_path / "config", upstream_url, redis.url, on_error)
    stderr = ""
    try:
        status, _, made = admin(
            gateway.admin_port,
            "POST",
            "/admin/keys",
            {"name": "api-user", "plans": {"soccer": "trial"}},
        )
        assert status == 201, made
        api_secret = made["key"]
        wait_for(
            lambda: all(
                call(gateway.proxy_port, "/soccer/x", headers={"X-API-Key": api_secret}).status
                == 200
                for _ in range(6)
            ),
            5,
            "the new key served by both workers",
        )
        # Each worker read the store empty at its start and learnt which store it follows from
        # the announcement of its first key (else a lost key would look like a deleted one):
        # serving that key above, both know it.
        before = scrape(gateway.admin_port).series("gateway_storage_errors_total", "operation")
        with Traffic(gateway.proxy_port, ("file-secret", api_secret)) as traffic:
            time.sleep(0.5)
            redis.stop()
            broken = time.monotonic()
            admin_answers = [
                (method, path, *admin(gateway.admin_port, method, path, body))
                for method, path, body in STORAGE_CALLS
            ]
            time.sleep(max(0.0, broken + OUTAGE_SECONDS - time.monotonic()))
            restarting = time.monotonic()
            redis.start()  # empty: nothing is persisted
            ready = wait_for(
                lambda: admin(gateway.admin_port, "GET", "/readyz")[0] == 200 and time.monotonic(),
                5,
                "/readyz 200 once Redis is back",
            )
            dropped = wait_for(
                lambda: next(
                    (a for a in traffic.answers if a.secret == api_secret and a.status == 401),
                    None,
                ),
                3,
                "the API key the empty storage lacks refused",
            )
            time.sleep(0.8)  # answers after it, from both workers
        after = scrape(gateway.admin_port).series("gateway_storage_errors_total", "operation")
    finally:
        stderr = stop_gateway(gateway)

    assert traffic.errors == []  # every request answered, none hung past the client's 5 s
    during = traffic.sent_between(broken, restarting)
    assert len(during) >= 10
    for answer in during:
        assert answer.latency <= STORAGE_TIMEOUT + LATENCY_MARGIN, answer
        if on_error == "deny":
            assert (answer.status, answer.code) == (503, "storage_unavailable"), answer
            assert answer.retry_after == "1"
        else:  # each worker its own share of the rate, for either key: both known from memory
            assert (answer.status, answer.code) in {(200, None), (429, "throttled")}, answer
    if on_error == "local":
        # 2 workers x ceil(20 * 0.5) a second, for each key; over the outage (and a second
        # window it may straddle) no more than that.
        for secret in traffic.secrets:
            mine = [a for a in during if a.secret == secret and a.status == 200]
            assert 1 <= len(mine) <= 2 * 10 * 3, len(mine)
            assert {a.rate_limit for a in mine} == {"10"}  # the local share, told as such

    for method, path, status, content_type, body in admin_answers:
        assert status == 503, (method, path, status, body)
        assert content_type == "application/problem+json", (method, path)
        assert body["code"] == "storage_unavailable", (method, path, body)

    # Back: the shared limits apply again at once, /readyz is 200, and the API key the storage
    # lost with its data is dropped (every gateway on that storage drops it) and said so.
    file_after = traffic.sent_between(restarting, float("inf"), "file-secret")
    shared = next(a for a in file_after if a.rate_limit == str(RATE))
    print(
        f"\n[{on_error}] back in {shared.answered - restarting:.3f}s after the restart began "
        f"(/readyz 200 after {ready - restarting:.3f}s); slowest answer during the outage "
        f"{max(a.latency for a in during) * 1000:.0f} ms"
    )
    assert shared.answered - restarting < 2.0
    shared_from = [a for a in file_after if a.sent >= shared.answered]
    assert all(a.rate_limit == str(RATE) for a in shared_from if a.status in (200, 429))
    assert {a.status for a in shared_from} <= {200, 429}
    window = [a for a in shared_from if a.status == 200 and a.sent < shared_from[0].sent + 1.0]
    assert len(window) <= RATE  # one shared window, the count begun afresh by the empty Redis
    # (Each worker drops it on its own, within a second of Redis answering.)
    assert dropped.sent - restarting < 1.5
    api_after = traffic.sent_between(dropped.answered + 0.5, float("inf"), api_secret)
    assert api_after and {(a.status, a.code) for a in api_after} == {(401, "unauthorized")}

    grown = {op: after.get(op, 0) - before.get(op, 0) for op in after}
    for operation in ("hit", "key_write", "key_read", "credit", "usage", "reset", "ping"):
        assert grown.get((operation,), 0) >= 1, (operation, grown)
    assert "Traceback" not in stderr, stderr
    lost = [line for line in stderr.splitlines() if "no longer holds 1 API keys" in line]
    assert len(lost) == 2, stderr  # one for each worker
    assert all(" ERROR " in line and "api-user" in line for line in lost), lost


def key_statuses(port: int, secret: str, count: int = 6) -> set[int]:
    """The statuses of `count` requests with `secret` to the proxy at `port` (both workers)."""
    headers = {"X-API-Key": secret}
    return {call(port, "/soccer/x", headers=headers).status for _ in range(count)}


def test_a_gateway_cut_off_learns_what_it_missed_once_it_is_back(
    tmp_path: Path, upstream_url: str, fresh_redis_server: RedisServer
) -> None:
    """A key deleted and another created through one gateway while a second one could not
    reach Redis (a partition: no reset, packets lost): once back, the second gateway refuses
    the deleted key and serves the new one, on both workers, within a second."""
    redis = fresh_redis_server
    with CuttableRelay(redis.port) as relay:
        cut_url = f"redis://127.0.0.1:{relay.port}"
        writer = start_gateway(tmp_path / "writer", upstream_url, redis.url, "deny")
        status, _, doomed = admin(
            writer.admin_port,
            "POST",
            "/admin/keys",
            {"name": "doomed", "plans": {"soccer": "trial"}},
        )
        assert status == 201
        try:
            follower = start_gateway(tmp_path / "follower", upstream_url, cut_url, "local")
        except BaseException:
            stop_gateway(writer)
            raise
        try:
            wait_for(
                lambda: key_statuses(follower.proxy_port, doomed["key"]) == {200},
                5,
                "the key served",
            )
            relay.cut(silent=True)
            assert admin(writer.admin_port, "DELETE", "/admin/keys/doomed")[0] == 204
            status, _, newcomer = admin(
                writer.admin_port,
                "POST",
                "/admin/keys",
                {"name": "newcomer", "plans": {"soccer": "trial"}},
            )
            assert status == 201
            # Cut off, it serves what the storage last told it (on_error: local).
            assert key_statuses(follower.proxy_port, doomed["key"], 2) == {200}
            assert key_statuses(follower.proxy_port, newcomer["key"], 2) == {401}
            assert admin(follower.admin_port, "GET", "/readyz")[0] == 503
            relay.mend()
            mended = time.monotonic()
            wait_for(
                lambda: (
                    key_statuses(follower.proxy_port, doomed["key"]) == {401}
                    and key_statuses(follower.proxy_port, newcomer["key"]) == {200}
                ),
                5,
                "the changes made while cut off",
            )
            took = time.monotonic() - mended
            print(f"\nthe changes made while cut off honoured {took:.3f}s after it was back")
            assert took < 1.5  # within a second of the storage answering, with a margin
            assert admin(follower.admin_port, "GET", "/readyz")[0] == 200
        finally:
            follower_stderr = stop_gateway(follower)
            stop_gateway(writer)
    assert "Traceback" not in follower_stderr, follower_stderr
    # From the storage's log of changes, not a read of every key; and no false alarm.
    assert "caught up on 2 changes" in follower_stderr, follower_stderr
    assert "no longer holds" not in follower_stderr, follower_stderr


def test_key_changes_flow_through_a_sentinel_failover_under_traffic(
    tmp_path: Path, upstream_url: str, fresh_redis_sentinel: RedisSentinelGroup
) -> None:
    """SENTINEL FAILOVER while a gateway serves: no request fails, and a key created and
    one deleted through another gateway afterwards are announced to both its workers on the
    new master, not found late by a version check."""
    group = fresh_redis_sentinel
    writer = start_gateway(tmp_path / "writer", upstream_url, group.url, "deny")
    try:
        server = start_gateway(tmp_path / "server", upstream_url, group.url, "deny")
    except BaseException:
        stop_gateway(writer)
        raise
    try:

        def create(name: str) -> str:
            body = {"name": name, "plans": {"soccer": "trial"}}
            status, _, made = admin(writer.admin_port, "POST", "/admin/keys", body)
            assert status == 201, made
            secret: str = made["key"]
            return secret

        doomed = create("doomed")
        wait_for(lambda: key_statuses(server.proxy_port, doomed) == {200}, 5, "the key served")
        with Traffic(server.proxy_port, ("file-secret",)) as traffic:
            promoted = group.failover()

            def subscribed_on_the_new_master() -> bool:
                with redis_py.Redis(port=promoted.port, socket_timeout=5) as client:
                    found = dict(client.pubsub_numsub(CHANNEL)).get(CHANNEL.encode(), 0)
                return found >= 4  # two workers of each gateway

            wait_for(subscribed_on_the_new_master, 5, "every worker subscribed on the new master")
        answers = [(a.status, a.code) for a in traffic.answers]
        assert traffic.errors == [] and answers
        # (The client asks faster than the plan's rate: 429 is the shared limit at work.)
        assert set(answers) <= {(200, None), (429, "throttled"), (503, "storage_unavailable")}
        failed = sum(1 for a in answers if a[0] == 503)
        print(f"\nSENTINEL FAILOVER: {failed} of {len(answers)} requests answered 503")

        newcomer = create("newcomer")
        assert admin(writer.admin_port, "DELETE", "/admin/keys/doomed")[0] == 204
        changed = time.monotonic()
        wait_for(
            lambda: (
                key_statuses(server.proxy_port, newcomer) == {200}
                and key_statuses(server.proxy_port, doomed) == {401}
            ),
            5,
            "the changes after the failover",
        )
        took = time.monotonic() - changed
        print(f"key changes after the failover honoured in {took:.3f}s")
    finally:
        stderr = stop_gateway(server)
        stop_gateway(writer)
    assert "Traceback" not in stderr, stderr
    assert "announcement was lost" not in stderr, stderr
