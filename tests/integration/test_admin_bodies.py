"""The body of an admin call as integrators' scripts send it (a real gateway worker, with a
token): JSON whatever the Content-Type says, and an empty one where a body is needed is said
to be missing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.server import Worker
from tests.support.admin_port import TOKEN
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway

AUTH = {"Authorization": f"Bearer {TOKEN}"}
API = """
products:
  soccer:
    upstream: {url: "http://127.0.0.1:9"}
    routes: [{path: "/soccer/{rest:path}"}]
plans:
  trial: {rate: {limit: 10, per: second}}
"""


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[tuple[Worker, aiohttp.ClientSession]]:
    config = write_config(tmp_path / "config", API, server=worker_server_yaml())
    async with (
        running_gateway(config, env={"GATEWAY_ADMIN_TOKEN": TOKEN}) as worker,
        aiohttp.ClientSession(headers=AUTH) as session,
    ):
        yield worker, session


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/x-www-form-urlencoded", "text/plain"],
)
async def test_a_json_body_is_taken_whatever_its_content_type(
    admin: tuple[Worker, aiohttp.ClientSession], content_type: str | None
) -> None:
    """`curl -d` (the README's examples) sends application/x-www-form-urlencoded."""
    worker, session = admin
    url = f"http://127.0.0.1:{worker.admin_port}/admin/keys"
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = b'{"name": "acme", "plans": {"soccer": "trial"}}'
    async with session.post(url, data=body, headers=headers, skip_auto_headers=["Content-Type"]):
        pass
    async with session.get(f"{url}/acme") as response:
        assert response.status == 200
        assert (await response.json())["plans"] == {"soccer": "trial"}


@pytest.mark.parametrize(("method", "path"), [("POST", "/admin/keys"), ("PATCH", "/admin/keys/a")])
async def test_an_empty_body_where_one_is_needed_is_said_to_be_missing(
    admin: tuple[Worker, aiohttp.ClientSession], method: str, path: str
) -> None:
    """It was told as JSON expected at line 1 column 1."""
    worker, session = admin
    url = f"http://127.0.0.1:{worker.admin_port}{path}"
    async with session.request(method, url, data=b"") as response:
        assert response.headers["Content-Type"] == "application/problem+json"
        problem = await response.json(content_type=None)
    assert (response.status, problem["detail"]) == (400, "body: is required, a JSON object")
