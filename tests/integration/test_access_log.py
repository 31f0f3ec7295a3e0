"""The access log of a real `gateway run` written to a pipe, as a container runtime reads it:
lines are batched, yet none is lost at SIGTERM, split, or mixed with another worker's."""

from __future__ import annotations

import http.client
import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.config import server_yaml
from tests.support.operations import ThreadedUpstream, call, serving_workers, wait_for
from tests.support.processes import GatewayProcess
from tests.support.sockets import free_ports

SECRET = "log-secret-key-0042"
API = """
products:
  soccer:
    upstream: {{url: "{upstream}", timeout: 5s}}
    routes:
      - path: /soccer/{{rest:path}}
plans:
  open: {{}}
keys:
  - {{name: log-user, key: {secret}, plans: {{soccer: open}}}}
"""

REQUESTS = 1200  # about 300 KiB of lines: many batches from each worker
CLIENTS = 6
PER_CONNECTION = 40  # a new connection now and then, so that both workers get some


def write_config(
    directory: Path, upstream_url: str, storage_url: str, workers: int = 1
) -> tuple[int, int]:
    proxy_port, admin_port = free_ports(2)
    directory.mkdir(parents=True, exist_ok=True)
    server = server_yaml(proxy_port, admin_port, storage_url, workers=workers)
    (directory / "00-server.yaml").write_text(server)
    (directory / "10-api.yaml").write_text(API.format(upstream=upstream_url, secret=SECRET))
    return proxy_port, admin_port


def send_requests(port: int, client: int, count: int) -> list[str]:
    """`count` keep-alive GETs of /soccer/n/<client>/<connection>/<i>, a new connection every
    PER_CONNECTION requests; returns the paths answered 200."""
    answered = []
    connection: http.client.HTTPConnection | None = None
    for number in range(count):
        if number % PER_CONNECTION == 0:
            if connection is not None:
                connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert connection is not None
        path = f"/soccer/n/{client}/{number // PER_CONNECTION}/{number}"
        connection.request("GET", path, headers={"X-API-Key": SECRET})
        response = connection.getresponse()
        response.read()
        if response.status == 200:
            answered.append(path)
    if connection is not None:
        connection.close()
    return answered


@pytest.mark.parametrize("workers", [None, 2], ids=["one-process", "two-workers"])
def test_every_line_is_written_whole_by_sigterm(
    tmp_path: Path, request: pytest.FixtureRequest, workers: int | None
) -> None:
    storage = request.getfixturevalue("redis_server").url if workers else "memory://"
    with ThreadedUpstream() as upstream:
        proxy_port, admin_port = write_config(tmp_path / "config", upstream.url, storage)
        gateway = GatewayProcess(tmp_path / "config", workers=workers, stdout_pipe=True)
        try:
            gateway.start(proxy_port, admin_port)
            if workers:
                serving_workers(gateway, workers)
            share = REQUESTS // CLIENTS
            with ThreadPoolExecutor(CLIENTS) as pool:
                batches = list(
                    pool.map(
                        send_requests, [proxy_port] * CLIENTS, range(CLIENTS), [share] * CLIENTS
                    )
                )
            sent = [path for batch in batches for path in batch]
            assert len(sent) == REQUESTS

            # At once: the last lines are still in their batches, and SIGTERM must write them.
            gateway.signal(signal.SIGTERM)
            assert gateway.stop() == 0, gateway.stderr()
            out = gateway.stdout()
        finally:
            gateway.close()

    assert out.endswith("\n")
    # Every line is one whole JSON object: a split or interleaved line would not parse.
    entries = [json.loads(line) for line in out.splitlines()]
    logged = [entry["path"] for entry in entries if entry["path"].startswith("/soccer/n/")]
    assert sorted(logged) == sorted(sent)
    assert len({entry["request_id"] for entry in entries}) == len(entries)
    # One worker serves a connection, and its lines keep the order of its answers.
    by_connection: dict[str, list[int]] = {}
    for path in logged:
        client, connection, number = path.removeprefix("/soccer/n/").split("/")
        by_connection.setdefault(f"{client}/{connection}", []).append(int(number))
    assert all(numbers == sorted(numbers) for numbers in by_connection.values())


def test_a_lone_line_is_written_within_a_second(tmp_path: Path) -> None:
    with ThreadedUpstream() as upstream:
        proxy_port, admin_port = write_config(tmp_path / "config", upstream.url, "memory://")
        gateway = GatewayProcess(tmp_path / "config", stdout_pipe=True)
        try:
            gateway.start(proxy_port, admin_port)
            assert call(proxy_port, "/soccer/lone", headers={"X-API-Key": SECRET}).status == 200

            def lone_line_logged() -> bool:
                return any(entry["path"] == "/soccer/lone" for entry in gateway.access_log())

            # The batch's timer writes it, with nothing else coming and the gateway running.
            wait_for(lone_line_logged, 3.0, "the lone request's line on stdout")
            assert gateway.proc is not None and gateway.proc.poll() is None
        finally:
            gateway.close()


def test_a_known_key_no_longer_taken_is_named_in_its_line(tmp_path: Path) -> None:
    # The operator reading the log wants to know whose expired key is still calling; the
    # client's 401 names it too. A key the gateway does not know stays unnamed.
    with ThreadedUpstream() as upstream:
        proxy_port, admin_port = write_config(tmp_path / "config", upstream.url, "memory://")
        with (tmp_path / "config" / "10-api.yaml").open("a") as api:
            api.write("  - {name: old-user, key: old-secret, plans: {soccer: open},")
            api.write(" expires: 2020-01-01T00:00:00Z}\n")
        gateway = GatewayProcess(tmp_path / "config", stdout_pipe=True)
        try:
            gateway.start(proxy_port, admin_port)
            for path, secret in (("/soccer/expired", "old-secret"), ("/soccer/unknown", "nope")):
                assert call(proxy_port, path, headers={"X-API-Key": secret}).status == 401
            lines: dict[str, dict[str, object]] = {}

            def both_logged() -> bool:
                lines.update((entry["path"], entry) for entry in gateway.access_log())
                return {"/soccer/expired", "/soccer/unknown"} <= lines.keys()

            wait_for(both_logged, 3.0, "the two 401s' lines on stdout")
            assert lines["/soccer/expired"]["key"] == "old-user"
            assert lines["/soccer/unknown"]["key"] == ""
            assert lines["/soccer/expired"]["status"] == 401
        finally:
            gateway.close()
