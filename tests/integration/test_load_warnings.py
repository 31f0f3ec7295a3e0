"""The warnings of a config load, said once per load however many workers serve it (README,
"Operating it"): on real `gateway run` processes, their stderr counted line by line.

The config's own warnings (an expired certificate, a `*.yml` file left unread) are the
supervisor's to tell, or the single process's; what only a worker sees, the API keys in the
storage that the config does not fit, is worker 0's. Each was said by every process that
touched the load: 1 + N times with N workers, or (a child's) not at all.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config.isolated import CHILD_FROM_BYTES
from tests.support.certificates import make_expired_certificate
from tests.support.config import API_FILE, SERVER_FILE, edit_for_sighup_alone, server_yaml
from tests.support.operations import serving_workers, wait_for
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.sockets import closed_port, free_ports

API = """\
products:
  shop:
    upstream: {{url: "http://127.0.0.1:{closed}"}}
    routes: [{{path: "/shop/{{rest:path}}"}}]
plans:
  trial: {{rate: {{limit: 100, per: second}}}}
{gold}"""
GOLD = "  gold: {quota: {limit: 100, per: day}}\n"

UNREAD = "not read: only a folder's *.yaml files are"
EXPIRED = "expired on 2020-01-02 00:00:00 UTC: clients that check certificates refuse it"
NOT_IN_CONFIG = "API keys naming a product or plan the config no longer has"
RELOADED = "config reloaded from"
# A loaded 2-core box starts two workers and reloads them in far less.
WITHIN = 20.0


@contextlib.contextmanager
def serving(
    config: Path, proxy_port: int, admin_port: int, tls: ssl.SSLContext | None = None
) -> Iterator[GatewayProcess]:
    """`gateway run` on `config`, started; stopped at the end, with exit code 0 and no
    traceback in its stderr."""
    gateway = GatewayProcess(config)
    try:
        gateway.start(proxy_port, admin_port, tls=tls)
        yield gateway
    finally:
        code, stderr = gateway.stop(timeout=15), gateway.stderr()
        gateway.close()
    assert code == 0, stderr
    assert "Traceback" not in stderr


def lines_with(gateway: GatewayProcess, text: str) -> int:
    return sum(text in line for line in gateway.stderr().splitlines())


def reload_and_wait(gateway: GatewayProcess, processes: int) -> None:
    """SIGHUP, then wait until each of `processes` (the supervisor and each worker, or the
    single process) has applied the reload: each tells what it tells before it says so."""
    before = lines_with(gateway, RELOADED)
    gateway.signal(signal.SIGHUP)
    wait_for(
        lambda: lines_with(gateway, RELOADED) >= before + processes,
        WITHIN,
        f"{processes} processes reloaded",
    )


def unverified() -> ssl.SSLContext:
    """A client that takes the expired certificate (as a client that does not check does)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.mark.parametrize("read_in", ["the process", "a child"])
def test_an_expired_certificate_and_an_unread_file_are_said_once_per_load_by_two_workers(
    tmp_path: Path, redis_server: RedisServer, read_in: str
) -> None:
    """The supervisor reads the config (a big one in a forked child) and hands it to its
    workers, which build the TLS context again: only the supervisor tells the warnings."""
    certificate = make_expired_certificate(tmp_path / "tls")
    config = tmp_path / "config"
    config.mkdir()
    proxy_port, admin_port = free_ports(2)
    tls = f"  tls: {{cert: {certificate.cert}, key: {certificate.key}}}\n"
    server = server_yaml(proxy_port, admin_port, redis_server.url, workers=2)
    (config / SERVER_FILE).write_text(server.replace("storage:\n", f"{tls}storage:\n"))
    (config / API_FILE).write_text(API.format(closed=closed_port(), gold=""))
    (config / "20-plans.yml").write_text("plans: {}\n")
    if read_in == "a child":
        (config / "30-padding.yaml").write_text("# padding\n" * (CHILD_FROM_BYTES // 10 + 1))
    with serving(config, proxy_port, admin_port, tls=unverified()) as gateway:
        serving_workers(gateway, 2)
        assert lines_with(gateway, UNREAD) == 1, gateway.stderr()
        assert lines_with(gateway, EXPIRED) == 1, gateway.stderr()

        reload_and_wait(gateway, processes=3)
        assert lines_with(gateway, UNREAD) == 2, gateway.stderr()
        assert lines_with(gateway, EXPIRED) == 2, gateway.stderr()
        named = f"the certificate file {certificate.cert}: certificate 1 of 1 (CN=localhost)"
        assert f"{named} {EXPIRED}" in gateway.stderr()


def test_a_single_process_says_the_warnings_of_a_big_reload_read_by_a_child(
    tmp_path: Path,
) -> None:
    """A lone worker reloads a big config in a new Python (`python -m gateway.config`) whose
    stderr it keeps only for a failure: the warnings travel back with the config."""
    config = tmp_path / "config"
    config.mkdir()
    proxy_port, admin_port = free_ports(2)
    (config / SERVER_FILE).write_text(server_yaml(proxy_port, admin_port, "memory://"))
    (config / API_FILE).write_text(API.format(closed=closed_port(), gold=""))
    (config / "20-plans.yml").write_text("plans: {}\n")
    (config / "30-padding.yaml").write_text("# padding\n" * (CHILD_FROM_BYTES // 10 + 1))
    with serving(config, proxy_port, admin_port) as gateway:
        assert lines_with(gateway, UNREAD) == 1, gateway.stderr()
        reload_and_wait(gateway, processes=1)
        assert lines_with(gateway, UNREAD) == 2, gateway.stderr()


def test_api_keys_the_config_does_not_fit_are_said_once_by_two_workers(
    tmp_path: Path, fresh_redis_server: RedisServer
) -> None:
    """Every worker reads the same API keys; worker 0 alone says that a reload took out the
    plan one names, and so at a start without that plan."""
    config = tmp_path / "config"
    config.mkdir()
    proxy_port, admin_port = free_ports(2)
    server = server_yaml(proxy_port, admin_port, fresh_redis_server.url, workers=2)
    (config / SERVER_FILE).write_text(server)
    closed = closed_port()
    api_file = config / API_FILE
    api_file.write_text(API.format(closed=closed, gold=GOLD))
    with serving(config, proxy_port, admin_port) as gateway:
        serving_workers(gateway, 2)
        connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
        body = json.dumps({"name": "acme", "plans": {"shop": "gold"}})
        connection.request("POST", "/admin/keys", body=body)
        response = connection.getresponse()
        response.read()
        connection.close()
        assert response.status == 201

        edit_for_sighup_alone(api_file, API.format(closed=closed, gold=""))
        reload_and_wait(gateway, processes=3)
        assert lines_with(gateway, NOT_IN_CONFIG) == 1, gateway.stderr()

    with serving(config, proxy_port, admin_port) as restarted:
        serving_workers(restarted, 2)  # each has read the keys before it serves
        assert lines_with(restarted, NOT_IN_CONFIG) == 1, restarted.stderr()
