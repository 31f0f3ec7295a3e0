"""The admin keys API on a real gateway (one process, memory:// storage unless said otherwise; the
rig fixture): the keys API across a reload, while Redis is away, and with the storage away since
the start.
"""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest

from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.keys_api_rig import API, Rig, create
from tests.support.redis_servers import RedisServer
from tests.support.sockets import closed_port
from tests.support.upstream import running_upstream


async def test_a_reload_is_applied_to_api_keys_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_upstream() as upstream:
        config_dir = write_config(
            tmp_path / "config", API.format(upstream=upstream.url), server=worker_server_yaml()
        )
        async with (
            running_gateway(config_dir, watch=True) as worker,
            aiohttp.ClientSession() as session,
        ):
            rig = Rig(worker, session)
            secret = (
                await create(rig, "acme", plans={"soccer": "trial", "weather": "production"})
            )["key"]
            assert (await rig.proxy(secret, "/weather/x"))[0] == 200

            # The next config drops the plan `production` and declares a file key `acme`.
            edited = API.format(upstream=upstream.url).replace("  production: {}\n", "")
            edited += "  - {name: acme, key: acme-file-secret, plans: {weather: trial}}\n"
            (config_dir / "10-api.yaml").write_text(edited)
            await worker.reload_now()  # a reload is read off the event loop: await it

            # The file's key of that name wins; the API key is not served meanwhile.
            status, problem = await rig.proxy(secret)
            assert status == 401 and problem["detail"] == "The API key is not valid."
            assert (await rig.proxy("acme-file-secret", "/weather/x"))[0] == 200
            status, shown, _ = await rig.call("GET", "/admin/keys/acme")
            assert status == 200 and shown["source"] == "file"

            # Without the file key again, the API key is back, minus the plan that is gone.
            (config_dir / "10-api.yaml").write_text(
                API.format(upstream=upstream.url).replace("  production: {}\n", "")
            )
            caplog.clear()
            await worker.reload_now()  # a reload is read off the event loop: await it
            # Taken, since API keys are data, but said: their customers would find it first.
            said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(
                "API keys naming a product or plan the config no longer has: 1"
                " (plan 'production': 1 key)" in m
                for m in said
            )
            assert (await rig.proxy(secret))[0] == 200
            status, problem = await rig.proxy(secret, "/weather/x")
            assert status == 403, problem
            assert "the plan 'production' for the product 'weather'," in problem["detail"]
            status, problem, _ = await rig.call(
                "PATCH", "/admin/keys/acme", {"plans": {"soccer": "production"}}
            )
            assert status == 400 and problem["detail"].startswith("plans.soccer: unknown plan")


async def test_keys_are_served_from_memory_while_redis_is_away(
    tmp_path: Path, fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_upstream() as upstream:
        config = write_config(
            tmp_path / "config",
            API.format(upstream=upstream.url),
            # Admit without limits while Redis is down: the keys alone decide.
            server=worker_server_yaml(storage_url=fresh_redis_server.url, on_error="allow"),
        )
        async with running_gateway(config) as worker, aiohttp.ClientSession() as session:
            rig = Rig(worker, session)
            secret = (await create(rig, "acme"))["key"]
            fresh_redis_server.stop()

            assert (await rig.proxy(secret))[0] == 200
            assert (await rig.proxy("made-up"))[0] == 401
            status, problem, _ = await rig.call("POST", "/admin/keys", {"name": "later"})
            assert status == 503 and problem["code"] == "storage_unavailable"
            # The client is told to retry; the operator is told why.
            assert any("admin keys API:" in r.getMessage() for r in caplog.records)
            status, problem, _ = await rig.call("PATCH", "/admin/keys/acme", {"disabled": True})
            assert status == 503 and problem["code"] == "storage_unavailable"
            # Listing is served from memory too.
            status, listed, _ = await rig.call("GET", "/admin/keys")
            assert status == 200 and "acme" in [key["name"] for key in listed["keys"]]


async def test_no_list_before_the_api_keys_were_ever_read(tmp_path: Path) -> None:
    """With the storage away since the start, a list of the file's keys alone would say that
    every API key is gone: 503 instead, until they have been read."""
    storage_url = f"redis://127.0.0.1:{closed_port()}/0"
    async with running_upstream() as upstream:
        config = write_config(
            tmp_path / "config",
            API.format(upstream=upstream.url),
            server=worker_server_yaml(storage_url=storage_url, storage_timeout="200ms"),
        )
        async with running_gateway(config) as worker, aiohttp.ClientSession() as session:
            status, problem, _ = await Rig(worker, session).call("GET", "/admin/keys")
    assert (status, problem["code"]) == (503, "storage_unavailable")
