"""One secret, two keys: a file key and an API key that hold the same secret, on real gateway
workers (in the test's process) sharing a real redis-server.

The rule (README, "Keys as data"): the secret is the file key's, in every process and whatever
came first; a worker says so at WARNING (with several, worker 0 alone), naming both keys, once
per config it applies and once when the storage brings it such an API key. A reload is not
refused for it: at a start the API keys are read after the config (or, with the storage away,
much later), and another gateway sharing the storage can hand out the secret at any time, so
refusing would only cover one of the orders in which the two keys can meet.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import logging
import signal
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.server import Worker
from tests.support.config import (
    API_FILE,
    edit_for_sighup_alone,
    server_yaml,
    worker_server_yaml,
    write_config,
)
from tests.support.gateway import running_gateway
from tests.support.operations import ThreadedUpstream, call, serving_workers, wait_for
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.sockets import free_ports
from tests.support.upstream import running_upstream

API = """
products:
  soccer:
    upstream: {{url: "{upstream}"}}
    routes: [{{path: "/soccer/{{rest:path}}"}}]
  weather:
    upstream: {{url: "{upstream}"}}
    routes: [{{path: "/weather/{{rest:path}}"}}]
plans:
  trial: {{rate: {{limit: 1000, per: second}}}}
keys:
  - {{name: bystander, key: bystander-secret, plans: {{soccer: trial}}}}
"""

# A key change reaches another process within a second (README); a loaded 2-core box is slower.
HONOURED_WITHIN = 5.0


@dataclass
class Rig:
    worker: Worker
    session: aiohttp.ClientSession
    config_dir: Path

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.worker.admin_port}{path}"
        async with self.session.request(method, url, json=body) as response:
            return response.status, await response.json(content_type=None)

    async def proxy(self, secret: str, path: str) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.worker.proxy_port}{path}"
        async with self.session.get(url, headers={"X-API-Key": secret}) as response:
            return response.status, await response.json(content_type=None)

    async def create(self, name: str, **fields: Any) -> dict[str, Any]:
        body = {"name": name, "plans": {"soccer": "trial"}, **fields}
        status, created = await self.call("POST", "/admin/keys", body)
        assert status == 201, created
        return dict(created)

    async def add_file_key(self, name: str, secret: str) -> None:
        """Reload with a file key `name` holding `secret`, on the product weather only (so an
        answer on soccer tells which key the secret led to)."""
        api_file = self.config_dir / API_FILE
        api_file.write_text(
            api_file.read_text()
            + f'  - {{name: {name}, key: "{secret}", plans: {{weather: trial}}}}\n'
        )
        await self.worker.reload_now()


@asynccontextmanager
async def rig_on(tmp_path: Path, storage_url: str, folder: str) -> AsyncIterator[Rig]:
    async with running_upstream() as upstream:
        config_dir = write_config(
            tmp_path / folder,
            API.format(upstream=upstream.url),
            server=worker_server_yaml(storage_url=storage_url),
        )
        async with (
            running_gateway(config_dir, watch=True) as worker,
            aiohttp.ClientSession() as session,
        ):
            yield Rig(worker, session, config_dir)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def told(caplog: pytest.LogCaptureFixture, *names: str) -> list[str]:
    """The warnings that name every one of `names`."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING
        and all(f"'{name}'" in record.getMessage() for name in names)
    ]


async def eventually(condition: Callable[[], object], what: str) -> None:
    """Poll `condition` on the event loop (the gateway under test shares it)."""
    deadline = asyncio.get_running_loop().time() + HONOURED_WITHIN
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {HONOURED_WITHIN}s: {what}")
        await asyncio.sleep(0.02)


def rotated_out(secret: tuple[object, float | None] | None) -> bool:
    return secret is not None and secret[1] is not None


async def served_as_file_key(rig: Rig, secret: str, file_key: str) -> None:
    """`secret` leads to the file key `file_key` (on weather, which only it has)."""
    assert (await rig.proxy(secret, "/weather/x"))[0] == 200
    status, problem = await rig.proxy(secret, "/soccer/x")
    assert status == 403, problem
    assert problem["detail"] == f"The API key '{file_key}' has no plan for the product 'soccer'."


@pytest.mark.parametrize("storage", ["memory", "redis"])
async def test_a_reload_giving_a_file_key_an_api_keys_secret_serves_the_file_key_and_warns(
    tmp_path: Path, storage: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    api_name, file_name = unique("api"), unique("file")
    storage_url = "memory://"
    if storage == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        storage_url = server.url
    async with rig_on(tmp_path, storage_url, "config") as rig:
        secret = (await rig.create(api_name))["key"]
        assert (await rig.proxy(secret, "/soccer/x"))[0] == 200

        caplog.clear()
        await rig.add_file_key(file_name, secret)
        await served_as_file_key(rig, secret, file_name)
        said = told(caplog, file_name, api_name)
        assert len(said) == 1, said
        assert "served as the file key" in said[0]

        # Once per reload: a change of the API key meanwhile is not told again ...
        caplog.clear()
        status, _ = await rig.call("PATCH", f"/admin/keys/{api_name}", {"disabled": False})
        assert status == 200  # applied in this process before it is answered
        assert told(caplog, file_name, api_name) == []
        # ... and the next reload tells it again: the operator has not changed anything yet.
        await rig.worker.reload_now()
        assert len(told(caplog, file_name, api_name)) == 1
        await served_as_file_key(rig, secret, file_name)


async def test_at_a_start_the_api_keys_read_after_the_config_are_checked_too(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    api_name, file_name = unique("api"), unique("file")
    async with rig_on(tmp_path, redis_server.url, "first") as first:
        secret = (await first.create(api_name))["key"]
        # Another gateway on the same storage starts with a file key holding that secret: its
        # config is read before the API keys, which arrive once it follows the storage.
        caplog.clear()
        async with running_upstream() as upstream:
            config_dir = write_config(
                tmp_path / "second",
                API.format(upstream=upstream.url)
                + f'  - {{name: {file_name}, key: "{secret}", plans: {{weather: trial}}}}\n',
                server=worker_server_yaml(storage_url=redis_server.url),
            )
            async with running_gateway(config_dir) as worker, aiohttp.ClientSession() as session:
                said = told(caplog, file_name, api_name)
                assert len(said) == 1, said
                await served_as_file_key(Rig(worker, session, config_dir), secret, file_name)
        # The gateway whose file lacks that key serves the API key with it.
        assert (await first.proxy(secret, "/soccer/x"))[0] == 200


async def test_an_api_key_given_a_file_keys_secret_elsewhere_is_told_when_it_arrives(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Two gateways share the storage but not the file: one refuses to give an API key the
    secret of its file key (409); the other, which has no such file key, cannot know."""
    api_name, file_name = unique("api"), unique("file")
    file_secret = unique("secret")
    digest = hashlib.sha256(file_secret.encode()).hexdigest()
    async with (
        rig_on(tmp_path, redis_server.url, "with-file-key") as with_file_key,
        rig_on(tmp_path, redis_server.url, "without") as without,
    ):
        await with_file_key.add_file_key(file_name, file_secret)
        status, problem = await with_file_key.call(
            "POST", "/admin/keys", {"name": api_name, "key_sha256": digest}
        )
        assert status == 409, problem

        caplog.clear()
        await without.create(api_name, key_sha256=digest)
        await eventually(lambda: told(caplog, file_name, api_name), "a warning naming both")
        assert len(told(caplog, file_name, api_name)) == 1
        await served_as_file_key(with_file_key, file_secret, file_name)
        assert (await without.proxy(file_secret, "/soccer/x"))[0] == 200

        # Rotated out (during its grace, the API key still holds it): the same clash, not told
        # again; the API key's new secret is served by both gateways.
        status, rotated = await without.call(
            "POST", f"/admin/keys/{api_name}/rotate", {"grace": "1h"}
        )
        assert status == 200, rotated
        table = with_file_key.worker.runtime.key_store.table
        await eventually(lambda: rotated_out(table.secret(digest)), "the rotation followed")
        assert len(told(caplog, file_name, api_name)) == 1
        assert (await with_file_key.proxy(rotated["key"], "/soccer/x"))[0] == 200
        await served_as_file_key(with_file_key, file_secret, file_name)


async def test_a_rotated_out_secret_is_told_during_its_grace_and_not_after(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    in_grace, retired = unique("in-grace"), unique("retired")
    file_a, file_b = unique("file-a"), unique("file-b")
    async with rig_on(tmp_path, redis_server.url, "config") as rig:
        old_a = (await rig.create(in_grace))["key"]
        status, rotated_a = await rig.call(
            "POST", f"/admin/keys/{in_grace}/rotate", {"grace": "1h"}
        )
        assert status == 200
        old_b = (await rig.create(retired))["key"]
        status, _ = await rig.call("POST", f"/admin/keys/{retired}/rotate", {"grace": "100ms"})
        assert status == 200
        # Wait for the short grace to end: the old secret is then no key's (401).
        deadline = asyncio.get_running_loop().time() + HONOURED_WITHIN
        while (await rig.proxy(old_b, "/soccer/x"))[0] != 401:
            assert asyncio.get_running_loop().time() < deadline, "the grace never ended"
            await asyncio.sleep(0.05)

        caplog.clear()
        await rig.add_file_key(file_a, old_a)
        await rig.add_file_key(file_b, old_b)
        said = told(caplog, file_a, in_grace)
        # Told on both reloads (the second config still has file_a), as rotated out.
        assert len(said) == 2 and all("rotated-out" in message for message in said), said
        assert told(caplog, file_b, retired) == []
        await served_as_file_key(rig, old_a, file_a)
        await served_as_file_key(rig, old_b, file_b)
        assert (await rig.proxy(rotated_a["key"], "/soccer/x"))[0] == 200


def test_under_a_supervisor_each_worker_serves_the_file_key_and_one_says_so_on_sighup(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """`gateway run` with two workers: the supervisor validates the reload and hands it over;
    the workers, which alone read the API keys, all find the clash, and worker 0 tells it,
    once for the gateway."""
    api_name, file_name = unique("api"), unique("file")
    with ThreadedUpstream() as upstream:
        proxy_port, admin_port = free_ports(2)
        config = tmp_path / "config"
        config.mkdir()
        (config / "00-server.yaml").write_text(
            server_yaml(proxy_port, admin_port, redis_server.url, workers=2)
        )
        api_file = config / "10-api.yaml"
        api_text = textwrap.dedent(API.format(upstream=upstream.url))
        api_file.write_text(api_text + "#" + " " * 200 + "\n")  # room for the file key
        gateway = GatewayProcess(config)
        try:
            gateway.start(proxy_port, admin_port)
            workers = serving_workers(gateway, 2)
            connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
            body = json.dumps({"name": api_name, "plans": {"soccer": "trial"}})
            connection.request("POST", "/admin/keys", body=body)
            response = connection.getresponse()
            secret = json.loads(response.read())["key"]
            connection.close()
            assert response.status == 201

            edit_for_sighup_alone(
                api_file,
                api_text
                + f'  - {{name: {file_name}, key: "{secret}", plans: {{weather: trial}}}}\n',
            )
            gateway.signal(signal.SIGHUP)

            def lines_with(text: str) -> list[str]:
                return [line for line in gateway.stderr().splitlines() if text in line]

            # The supervisor's and each worker's; a worker tells the clash before it says so.
            wait_for(
                lambda: len(lines_with("config reloaded from")) >= 1 + len(workers),
                HONOURED_WITHIN,
                "the reload applied by each worker",
            )
            told = lines_with(
                f"the file key '{file_name}' has the secret of the API key '{api_name}'"
            )
            assert len(told) == 1, gateway.stderr()
            # New connections spread over both workers: each serves the secret as the file key.
            for _ in range(20):
                answer = call(proxy_port, "/soccer/x", headers={"X-API-Key": secret})
                assert answer.status == 403, answer.body
                assert f"'{file_name}' has no plan" in json.loads(answer.body)["detail"]
        finally:
            code, stderr = gateway.stop(timeout=15), gateway.stderr()
            gateway.close()
        assert code == 0, stderr
        assert "Traceback" not in stderr
