"""A drain whose storage is slow to close still exits 0 (README, "Drain").

The storage is a Redis over TLS behind a relay that keeps every TLS close (the client's
close_notify) from it: redis-py's close of each pooled connection waits for the server's answer
until its own timeout (the storage timeout), and then raises redis-py's TimeoutError. That
close is a step of the worker's closing like any other: it is named in a warning and left
behind, and the process exits 0. It used to end the worker with a traceback and exit 1 (seen
once on a Redis Cluster under load, where a plain TCP close was slower than the timeout).

A frozen Redis (SIGSTOP) would hold the close too, but the key store's check of the storage's
version, every 0.4 s, then finds the pooled connection dead first and drops it, more or less
often depending on the timing.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.config import server_yaml, write_config
from tests.support.operations import serving_workers
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import TlsRedisServer, tls_unavailable
from tests.support.sockets import free_ports
from tests.support.tls_relay import CloseHoldingRelay

SECRET = "drain-secret-key-0042"

API = """
products:
  soccer:
    upstream: {{url: "http://127.0.0.1:9/base"}}
    routes:
      - path: /soccer/{{rest:path}}
plans:
  metered:
    rate: {{limit: 1000, per: second}}
keys:
  - {{name: drain-user, key: {secret}, plans: {{soccer: metered}}}}
"""

# The drain's closing is bounded by 5 s (README, "Drain"); the rest is the process's start and
# exit on a busy 2-core machine.
EXIT_WITHIN = 15.0


@pytest.fixture
def tls12_redis(tmp_path: Path) -> Iterator[TlsRedisServer]:
    """TLS 1.2, whose alerts the relay can tell from other records."""
    reason = tls_unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = TlsRedisServer(tmp_path / "redis", "--tls-protocols", "TLSv1.2")
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_a_storage_that_does_not_close_is_left_behind_and_the_drain_exits_0(
    tmp_path: Path, tls12_redis: TlsRedisServer, workers: int
) -> None:
    with CloseHoldingRelay(tls12_redis.tls_port) as relay:
        proxy_port, admin_port = free_ports(2)
        write_config(
            tmp_path / "config",
            API.format(secret=SECRET),
            server=server_yaml(
                proxy_port, admin_port, tls12_redis.tls_url_at(relay.port), workers=workers
            ),
        )
        gateway = GatewayProcess(tmp_path / "config", env={"SSL_CERT_FILE": str(tls12_redis.cert)})
        try:
            gateway.start(proxy_port, admin_port)
            if workers > 1:
                serving_workers(gateway, workers)
            # The key store checks the storage's version every 0.4 s (CHECK_INTERVAL) on its
            # pooled connection; a check cut off by the drain drops that connection without
            # closing it gracefully, and there would be nothing left to hold. So the SIGTERM
            # comes right after a check was answered.
            relay.wait_for_reply(timeout=5)
            gateway.signal(signal.SIGTERM)
            assert gateway.proc is not None
            code = gateway.proc.wait(timeout=EXIT_WITHIN)
            stderr = gateway.stderr()
        finally:
            gateway.close()
        assert relay.held > 0  # the closes were held indeed
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    left_behind = re.findall(r"WARNING.*closing the storage client failed \((.*)\)", stderr)
    assert all("Timed out closing connection" in why for why in left_behind), stderr
    # One worker's SIGTERM came right after its check; another's may have cut its own off.
    assert len(left_behind) == 1 if workers == 1 else len(left_behind) >= 1, stderr
