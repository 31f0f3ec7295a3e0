"""A real `gateway run` and its ports: the admin token and the admin port's place, ports
another gateway holds, the listener's queue, workers given on the command line.

README, "The admin port" and "Operating it", end to end on real processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.answers import Answer
from tests.support.config import server_yaml, write_config
from tests.support.operations import (
    OPERATIONS_API,
    SECRET,
    ThreadedUpstream,
    call,
    children_of,
    scrape,
    wait_for,
    write_config_on_free_ports,
)
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.sockets import free_ports

TOKEN = "admin-token-7f3a9c"
PROBLEM = "application/problem+json"
# For tests that never proxy a request: port 9 (discard) answers nothing.
UNREACHED_UPSTREAM_API = OPERATIONS_API.format(upstream="http://127.0.0.1:9", secret=SECRET)


def problem(answer: Answer, status: int, code: str) -> dict[str, object]:
    assert answer.status == status, answer
    assert answer.headers["Content-Type"] == PROBLEM
    body: dict[str, object] = json.loads(answer.body)
    assert (body["status"], body["code"]) == (status, code)
    return body


# --- the admin port and its token -------------------------------------------------------


def test_admin_token_guards_admin_api_but_not_probes_or_metrics(tmp_path: Path) -> None:
    proxy_port, admin_port = write_config_on_free_ports(
        tmp_path / "config", "http://127.0.0.1:9", "memory://"
    )
    gateway = GatewayProcess(tmp_path / "config", env={"GATEWAY_ADMIN_TOKEN": TOKEN})
    try:
        gateway.start(proxy_port, admin_port)
        usage = "/admin/usage/ops-user"

        refused = call(admin_port, usage)
        problem(refused, 401, "unauthorized")
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        # Credentials that are not even UTF-8 are refused like any wrong ones.
        with socket.create_connection(("127.0.0.1", admin_port), timeout=5) as raw:
            raw.sendall(
                b"GET %b HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer \xff\xfe\r\n"
                b"Connection: close\r\n\r\n" % usage.encode()
            )
            reply = b""
            while chunk := raw.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 401 ") and b"application/problem+json" in reply
        problem(
            call(admin_port, usage, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized"
        )
        problem(call(admin_port, usage, headers={"Authorization": TOKEN}), 401, "unauthorized")
        allowed = call(admin_port, usage, headers={"Authorization": f"Bearer {TOKEN}"})
        assert allowed.status == 200
        assert json.loads(allowed.body)["key"] == "ops-user"

        for open_path in ("/metrics", "/healthz", "/readyz"):
            assert call(admin_port, open_path).status == 200, open_path

        # The admin endpoints do not exist on the proxy port: that is the gateway's own 404.
        for admin_path in ("/metrics", "/healthz", "/readyz", usage):
            answer = call(proxy_port, admin_path, headers={"Authorization": f"Bearer {TOKEN}"})
            problem(answer, 404, "invalid_route")

        for secret in (TOKEN, SECRET):
            assert secret not in gateway.stdout() + gateway.stderr()
    finally:
        assert gateway.stop() == 0, gateway.stderr()
        gateway.close()


def public_admin_config(directory: Path) -> Path:
    proxy_port, admin_port = free_ports(2)
    server = server_yaml(proxy_port, admin_port, "memory://").replace(
        f"admin_listen: 127.0.0.1:{admin_port}", f"admin_listen: 0.0.0.0:{admin_port}"
    )
    return write_config(
        directory,
        UNREACHED_UPSTREAM_API,
        server=server,
    )


def gateway_command(*args: str, token: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
    if token is not None:
        env["GATEWAY_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_a_public_admin_port_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    config = str(public_admin_config(tmp_path / "config"))
    message = (
        r"00-server\.yaml:\d+: server\.admin_listen: "
        r"is not a loopback address, so GATEWAY_ADMIN_TOKEN must be set"
    )

    run = gateway_command("run", "--config", config, token=None)
    assert run.returncode == 1
    assert run.stdout == ""
    assert re.search(message, run.stderr), run.stderr

    check = gateway_command("check", "--config", config, token=None)
    assert check.returncode == 1
    assert re.search(message, check.stdout), check.stdout

    with_token = gateway_command("check", "--config", config, token=TOKEN)
    assert (with_token.returncode, with_token.stdout) == (0, "ok\n"), with_token.stdout


# --- ports ---------------------------------------------------------------------------------


def test_a_second_gateway_on_the_same_ports_refuses_to_start(tmp_path: Path) -> None:
    """Workers share their ports with SO_REUSEPORT; another gateway must not join them."""
    config = tmp_path / "config"
    proxy_port, admin_port = write_config_on_free_ports(config, "http://127.0.0.1:9", "memory://")
    first = GatewayProcess(config)
    first.start(proxy_port, admin_port)
    try:
        second = gateway_command("run", "--config", str(config), token=None)
        assert second.returncode == 1
        assert re.search(
            rf"server\.listen: cannot listen on 127\.0\.0\.1:{proxy_port}: Address already in use",
            second.stderr,
        ), second.stderr
        # The first goes on serving, alone.
        assert call(proxy_port, "/soccer/x", headers={}).status == 401
    finally:
        assert first.stop() == 0

    # Another program on the admin port: the same clear answer, not a traceback.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the first's TIME_WAIT
        other.bind(("127.0.0.1", admin_port))
        other.listen()
        run = gateway_command("run", "--config", str(config), token=None)
    assert run.returncode == 1
    assert f"server.admin_listen: cannot listen on 127.0.0.1:{admin_port}" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_of_two_gateways_started_together_on_the_same_ports_one_serves(
    tmp_path: Path, redis_server: RedisServer, workers: int
) -> None:
    """Both would pass the port check before either bound (the workers bind once the keys are
    read), then share the ports, each answering part of the traffic: one must refuse."""
    config = tmp_path / "config"
    storage = "memory://" if workers == 1 else redis_server.url
    proxy_port, _ = write_config_on_free_ports(config, "http://127.0.0.1:9", storage)
    command = [sys.executable, "-m", "gateway", "run", "--config", str(config)]
    command += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
    both = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 20
        while all(each.poll() is None for each in both) and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = [each for each in both if each.poll() is not None]
        assert len(refused) == 1, "both gateways serve the same ports"
        assert refused[0].returncode == 1
        assert refused[0].stderr is not None
        assert "Address already in use" in refused[0].stderr.read().decode()
        serving = next(each for each in both if each is not refused[0])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                assert call(proxy_port, "/soccer/x", headers={}).status == 401
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the other gateway does not serve")
        serving.send_signal(signal.SIGTERM)
        assert serving.wait(timeout=30) == 0
    finally:
        for each in both:
            if each.poll() is None:
                each.kill()
                each.wait()
            if each.stderr is not None:
                each.stderr.close()


@pytest.mark.parametrize("exists", [True, False], ids=["shared-folder", "missing-folder"])
def test_an_inherited_metrics_folder_is_neither_read_nor_emptied(
    tmp_path: Path, redis_server: RedisServer, exists: bool
) -> None:
    """PROMETHEUS_MULTIPROC_DIR from the environment may be another gateway's: a gateway with
    workers makes a folder of its own inside it (and the folder, if missing), and leaves the
    other files alone, but for the folders killed gateways left there."""
    shared = tmp_path / "metrics" / "workers"
    shared.mkdir(parents=True)
    foreign = shared / "counter_4242.db"
    foreign.write_bytes(b"another program's counts")
    # A killed gateway's folder: its owner file is there, and nobody holds it locked.
    abandoned = shared / "gateway-metrics-killed"
    abandoned.mkdir()
    (abandoned / ".owner").write_bytes(b"")
    (abandoned / "counter_4343.db").write_bytes(b"a dead worker's counts")
    if not exists:
        shutil.rmtree(shared)
    config = tmp_path / "config"
    proxy_port, admin_port = write_config_on_free_ports(
        config, "http://127.0.0.1:9", redis_server.url
    )
    command = [sys.executable, "-m", "gateway", "run", "--config", str(config), "--workers", "2"]
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(shared)
    gateway = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if call(proxy_port, "/nowhere", headers={}).status == 404:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("the gateway does not serve")
        own = [folder for folder in shared.iterdir() if folder.is_dir()]
        assert len(own) == 1 and any(own[0].glob("*.db"))
        assert not abandoned.exists()
        if exists:
            assert foreign.read_bytes() == b"another program's counts"
        scrape = call(admin_port, "/metrics", headers={})
        assert scrape.status == 200 and b'code="invalid_route"' in scrape.body
    finally:
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=30) == 0
        assert gateway.stderr is not None
        gateway.stderr.close()
    # Its own folder is gone, the rest is as it was.
    assert [path.name for path in shared.iterdir()] == (["counter_4242.db"] if exists else [])


# --- the listener -------------------------------------------------------------------------

# New clients at once: more than the 100 uvloop's create_server listened with, fewer than the
# usual limit of 1,024 open files.
BURST = 600


def test_a_burst_of_new_clients_waits_in_the_queue_of_a_busy_worker(tmp_path: Path) -> None:
    """The kernel completes new connections and queues them until the worker accepts them; uvloop
    listened again with a queue of 100, so a burst of new clients past it while the worker was
    busy had its handshakes dropped and retried a second later (the gateway asked for 1,024)."""
    proxy_port, admin_port = write_config_on_free_ports(
        tmp_path / "config", "http://127.0.0.1:9", "memory://"
    )
    gateway = GatewayProcess(tmp_path / "config")
    burst: list[socket.socket] = []
    try:
        gateway.start(proxy_port, admin_port)
        gateway.signal(signal.SIGSTOP)  # busy: accepts nothing
        try:
            for _ in range(BURST):
                # A dropped handshake is retried after a second: no connect takes that long.
                burst.append(socket.create_connection(("127.0.0.1", proxy_port), timeout=0.9))
        finally:
            gateway.signal(signal.SIGCONT)
        assert len(burst) == BURST
    finally:
        for client in burst:
            client.close()
        gateway.close()


def test_workers_on_the_command_line_win_over_the_file_and_its_reloads(tmp_path: Path) -> None:
    """`--workers 1` on a file's `workers: 2` with memory:// storage: one worker, which serves
    and reloads. The file's count was judged instead, and the gateway refused to start."""
    config = tmp_path / "config"
    proxy_port, admin_port = free_ports(2)
    server = server_yaml(proxy_port, admin_port, "memory://", workers=2)
    write_config(config, UNREACHED_UPSTREAM_API, server=server)
    gateway = GatewayProcess(config, workers=1)
    try:
        gateway.start(proxy_port, admin_port)
        gateway.signal(signal.SIGHUP)
        reloads = "gateway_config_reloads_total"
        wait_for(lambda: scrape(admin_port).series(reloads, "result").get(("ok",)), 10, "reload")
        assert scrape(admin_port).series(reloads, "result").get(("error",), 0) == 0
        assert children_of(gateway.proc.pid if gateway.proc else 0) == []  # no supervisor
    finally:
        assert gateway.stop() == 0
        gateway.close()
    refused = GatewayProcess(config, workers=3)
    try:
        # Named as the user gave the count: the flag, not the variable that carries it.
        with pytest.raises(RuntimeError, match=r"\n--workers: server\.workers: memory://"):
            refused.start(proxy_port, admin_port)
    finally:
        refused.close()


# --- open files -----------------------------------------------------------------------------

# Started with a soft limit this low, the gateway would have room for a few dozen clients.
LOW_SOFT_LIMIT = 64
CLIENTS_AT_ONCE = 150
_WITH_LOW_SOFT_LIMIT = (
    "import os, resource, sys\n"
    "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({LOW_SOFT_LIMIT}, hard))\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _open_files_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open files line")


def test_the_soft_open_files_limit_is_raised_so_many_clients_are_served_at_once(
    tmp_path: Path,
) -> None:
    """Started with a soft limit of 64 open files (where systemd and recent container runtimes
    start processes at 1,024), the gateway raises it to the hard limit, and 150 clients
    connected at once are all answered. Without that, the clients past the limit were accepted
    and closed at once, unanswered."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4 * CLIENTS_AT_ONCE:
        pytest.skip(f"the hard limit of open files here is {hard}")
    with ThreadedUpstream() as upstream:
        proxy_port, admin_port = write_config_on_free_ports(
            tmp_path / "config", upstream.url, "memory://"
        )
        prefix = [sys.executable, "-c", _WITH_LOW_SOFT_LIMIT]
        gateway = GatewayProcess(tmp_path / "config", prefix=prefix)
        clients: list[socket.socket] = []
        try:
            gateway.start(proxy_port, admin_port)
            assert gateway.proc is not None
            soft, _ = _open_files_limits(gateway.proc.pid)
            assert soft != str(LOW_SOFT_LIMIT)
            for _ in range(CLIENTS_AT_ONCE):
                clients.append(socket.create_connection(("127.0.0.1", proxy_port), timeout=10))
            request = (
                b"GET /soccer/many HTTP/1.1\r\nHost: t\r\nX-API-Key: %b\r\n\r\n" % SECRET.encode()
            )
            heads = []
            for client in clients:  # all connected, each answered in turn
                client.sendall(request)
                heads.append(client.recv(64).split(b"\r\n", 1)[0])
            assert heads == [b"HTTP/1.1 200 OK"] * CLIENTS_AT_ONCE
        finally:
            for client in clients:
                client.close()
            assert gateway.stop() == 0
            err = gateway.stderr()
            gateway.close()
    assert f"open files: the limit was raised from {LOW_SOFT_LIMIT} to" in err
