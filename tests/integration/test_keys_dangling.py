"""API keys whose plan or product a reload took out of the config, on a real gateway and a
real Redis: what requests, the keys API, the usage API, the history and the billing export
make of them, and what comes back when the config does."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config.loader import load_config
from gateway.config.yamlnodes import ConfigError
from gateway.server import Worker
from tests.support.config import API_FILE, worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.redis_servers import RedisServer
from tests.support.upstream import running_upstream

PRODUCTS = """
products:
  soccer:
    upstream: {{url: "{upstream}"}}
    routes: [{{path: "/soccer/{{rest:path}}"}}]
{weather}plans:
  trial: {{rate: {{limit: 100, per: second}}}}
{gold}"""
WEATHER = """  weather:
    upstream: {{url: "{upstream}"}}
    routes: [{{path: "/weather/{{rest:path}}"}}]
"""
GOLD = "  gold: {quota: {limit: 100, per: day}}\n"


@dataclass
class Rig:
    worker: Worker
    session: aiohttp.ClientSession
    config_dir: Path
    upstream_url: str

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        url = f"http://127.0.0.1:{self.worker.admin_port}{path}"
        async with self.session.request(method, url, json=body) as response:
            if response.content_type == "text/csv":
                return response.status, await response.text()
            data = await response.json(content_type=None) if response.status != 204 else None
            return response.status, data

    async def proxy(self, secret: str, path: str) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.worker.proxy_port}{path}"
        async with self.session.get(url, headers={"X-API-Key": secret}) as response:
            return response.status, await response.json(content_type=None)

    async def reload(self, *, weather: bool = True, gold: bool = True) -> None:
        (self.config_dir / API_FILE).write_text(config_text(self.upstream_url, weather, gold))
        await self.worker.reload_now()  # a reload is read off the event loop: await it


def config_text(upstream: str, weather: bool = True, gold: bool = True) -> str:
    return PRODUCTS.format(
        upstream=upstream,
        weather=WEATHER.format(upstream=upstream) if weather else "",
        gold=GOLD if gold else "",
    )


@pytest.fixture
async def rig(tmp_path: Path, fresh_redis_server: RedisServer) -> AsyncIterator[Rig]:
    async with running_upstream() as upstream:
        config_dir = write_config(
            tmp_path / "config",
            config_text(upstream.url),
            server=worker_server_yaml(storage_url=fresh_redis_server.url, storage_timeout="2s"),
        )
        async with (
            running_gateway(config_dir, watch=True) as worker,
            aiohttp.ClientSession() as session,
        ):
            yield Rig(worker, session, config_dir, upstream.url)


async def acme_on_gold(rig: Rig) -> str:
    """The API key 'acme' with soccer on trial and weather on gold, 3 units of gold's quota
    used and 10 credited; its secret."""
    plans = {"soccer": "trial", "weather": "gold"}
    status, created = await rig.call("POST", "/admin/keys", {"name": "acme", "plans": plans})
    assert status == 201, created
    for _ in range(3):
        assert (await rig.proxy(created["key"], "/weather/x"))[0] == 200
    status, _ = await rig.call("POST", "/admin/usage/acme/weather/credit", {"amount": 10})
    assert status == 200
    return str(created["key"])


async def test_a_request_on_a_plan_taken_out_is_403_naming_it(rig: Rig) -> None:
    secret = await acme_on_gold(rig)
    await rig.reload(gold=False)

    # Not a 500, and the customer is told why, not that the key has no plan.
    status, problem = await rig.proxy(secret, "/weather/x")
    assert (status, problem["code"]) == (403, "forbidden"), problem
    assert problem["detail"] == (
        "The API key 'acme' has the plan 'gold' for the product 'weather',"
        " which this gateway no longer offers."
    )
    assert (await rig.proxy(secret, "/soccer/x"))[0] == 200


async def test_the_plan_back_the_key_works_with_its_counters(rig: Rig) -> None:
    secret = await acme_on_gold(rig)
    await rig.reload(gold=False)
    assert (await rig.proxy(secret, "/weather/x"))[0] == 403

    await rig.reload()
    assert (await rig.proxy(secret, "/weather/x"))[0] == 200
    status, usage = await rig.call("GET", "/admin/usage/acme")
    assert status == 200
    quota = usage["products"]["weather"]["quota"]
    assert (quota["used"], quota["credit"], quota["limit"]) == (4, 10, 110)


async def test_history_and_export_keep_what_was_used_before(rig: Rig) -> None:
    """They are the bill: read from the storage, not from the config."""
    await acme_on_gold(rig)
    await rig.reload(weather=False, gold=False)

    status, history = await rig.call("GET", "/admin/usage/acme/history")
    assert status == 200
    days = [(d["product"], d["plan"], d["requests"], d["units"]) for d in history["days"]]
    assert days == [("weather", "gold", 3, 3)]
    status, csv = await rig.call("GET", "/admin/usage.csv")
    assert status == 200 and ",acme,weather,gold,3,3\n" in csv


async def test_the_keys_api_marks_the_entries_the_config_lacks(rig: Rig) -> None:
    await acme_on_gold(rig)
    await rig.reload(gold=False)

    # The key keeps its plans, the entry that lost its plan marked.
    status, shown = await rig.call("GET", "/admin/keys/acme")
    assert status == 200 and shown["plans"] == {"soccer": "trial", "weather": "gold"}
    assert shown["not_in_config"] == {"weather": "plan"}
    status, listed = await rig.call("GET", "/admin/keys")
    assert status == 200 and listed["keys"] == [shown]

    await rig.reload(weather=False, gold=False)
    status, shown = await rig.call("GET", "/admin/keys/acme")
    assert status == 200 and shown["not_in_config"] == {"weather": "product"}

    await rig.reload()
    status, shown = await rig.call("GET", "/admin/keys/acme")
    assert status == 200 and shown["not_in_config"] == {}


async def test_the_usage_shows_a_product_whose_plan_was_taken_out(rig: Rig) -> None:
    await acme_on_gold(rig)
    await rig.reload(gold=False)

    # The product and its plan, marked; its quota cannot be read without the plan's period,
    # and is kept for when the plan is back.
    status, usage = await rig.call("GET", "/admin/usage/acme")
    assert status == 200
    assert usage["products"]["weather"] == {
        "plan": "gold",
        "not_in_config": "plan",
        "rate": None,
        "quota": None,
    }
    assert usage["products"]["soccer"]["not_in_config"] is None
    for method, path, body in (
        ("POST", "/admin/usage/acme/weather/credit", {"amount": 1}),
        ("DELETE", "/admin/usage/acme/weather", None),
    ):
        status, problem = await rig.call(method, path, body)
        assert (status, problem["code"]) == (404, "not_found"), problem
        assert problem["detail"].startswith(
            "The plan 'gold' of key 'acme' for product 'weather' is not in the running config"
        )


async def test_a_product_taken_out_keeps_its_counters_in_the_usage(rig: Rig) -> None:
    secret = await acme_on_gold(rig)
    await rig.reload(weather=False)

    # The product's routes went with it.
    status, problem = await rig.proxy(secret, "/weather/x")
    assert (status, problem["code"]) == (404, "invalid_route")
    status, usage = await rig.call("GET", "/admin/usage/acme")
    weather = usage["products"]["weather"]
    assert weather["not_in_config"] == "product"
    assert (weather["quota"]["used"], weather["quota"]["credit"]) == (3, 10)


async def test_a_patch_keeps_an_entry_it_does_not_change(rig: Rig) -> None:
    await acme_on_gold(rig)
    await rig.reload(gold=False)

    # The operator fixes something else: the entry that lost its plan is sent back as read.
    status, patched = await rig.call("PATCH", "/admin/keys/acme", {"disabled": True})
    assert status == 200 and patched["plans"]["weather"] == "gold"
    plans = {"soccer": {"plan": "trial", "rate": {"limit": 5, "per": "second"}}, "weather": "gold"}
    status, patched = await rig.call("PATCH", "/admin/keys/acme", {"plans": plans})
    assert status == 200, patched
    assert patched["plans"] == plans and patched["not_in_config"] == {"weather": "plan"}

    # A plan the config lacks is still refused where the body sets it.
    for body, field in (
        ({"soccer": "gold", "weather": "gold"}, "plans.soccer"),
        (
            {"soccer": "trial", "weather": {"plan": "gold", "quota": {"limit": 5, "per": "day"}}},
            "plans.weather.plan",
        ),
    ):
        status, problem = await rig.call("PATCH", "/admin/keys/acme", {"plans": body})
        assert status == 400, problem
        assert problem["detail"].startswith(f"{field}: unknown plan 'gold'"), problem
    status, problem = await rig.call(
        "POST", "/admin/keys", {"name": "new", "plans": {"weather": "gold"}}
    )
    assert status == 400 and problem["detail"].startswith("plans.weather: unknown plan 'gold'")

    # With the product gone too, the same.
    await rig.reload(weather=False, gold=False)
    status, patched = await rig.call("PATCH", "/admin/keys/acme", {"plans": plans})
    assert status == 200 and patched["not_in_config"] == {"weather": "product"}


async def test_a_reload_says_once_how_many_api_keys_lost_a_plan_or_product(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    await acme_on_gold(rig)
    plans = {"soccer": "gold", "weather": "gold"}
    status, _ = await rig.call("POST", "/admin/keys", {"name": "beta", "plans": plans})
    assert status == 201
    status, _ = await rig.call(
        "POST", "/admin/keys", {"name": "gamma", "plans": {"soccer": "trial"}}
    )
    assert status == 201

    caplog.clear()
    await rig.reload(weather=False, gold=False)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    told = [m for m in said if "API keys" in m and "config" in m]
    assert len(told) == 1, said
    assert told[0].startswith(
        "API keys naming a product or plan the config no longer has: 2"
        " (product 'weather': 2 keys; plan 'gold': 1 key); their requests"
    ), told

    caplog.clear()
    await rig.reload()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


async def test_a_gateway_started_without_the_plan_says_so_once_the_keys_are_read(
    rig: Rig, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A restart is a reload too: the keys are read after the config."""
    await acme_on_gold(rig)
    storage = worker_server_yaml(storage_url=rig.worker.config.storage.url)
    later_config = config_text(rig.upstream_url, gold=False)
    caplog.clear()
    async with running_gateway(write_config(tmp_path / "later", later_config, server=storage)):
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    told = [m for m in said if "config no longer has" in m]
    assert len(told) == 1, said
    assert told[0].startswith(
        "API keys naming a product or plan the config no longer has: 1 (plan 'gold': 1 key);"
    )


def test_a_file_key_cannot_name_a_plan_the_config_lacks(tmp_path: Path) -> None:
    text = config_text("http://127.0.0.1:1", gold=False)
    text += "keys:\n  - {name: f, key: f-secret, plans: {weather: gold}}\n"
    with pytest.raises(ConfigError, match="unknown plan 'gold'"):
        load_config(write_config(tmp_path / "c", text, server=worker_server_yaml()), env={})
