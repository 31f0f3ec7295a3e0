"""The keys API tests' rig (tests/integration/keys/): a gateway serving API in front of an
upstream, with calls to its admin keys API and requests on its proxy port, and a key created
through the API.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict

from gateway.server import Worker

API = """
products:
  soccer:
    upstream: {{url: "{upstream}"}}
    routes: [{{path: "/soccer/{{rest:path}}"}}]
  weather:
    upstream: {{url: "{upstream}"}}
    routes: [{{path: "/weather/{{rest:path}}"}}]
plans:
  trial: {{rate: {{limit: 100, per: second}}}}
  production: {{}}
keys:
  - name: file-key
    key: file-secret
    plans: {{soccer: trial}}
  - name: m-file-key
    key: m-file-secret
    plans: {{soccer: trial}}
    expires: 2020-01-01T00:00:00Z
"""


@dataclass
class Rig:
    worker: Worker
    session: aiohttp.ClientSession

    def admin(self, path: str) -> str:
        return f"http://127.0.0.1:{self.worker.admin_port}{path}"

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Any:
        """(status, JSON body, headers); `headers` as pairs: a name may come more than once."""
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        kwargs["headers"] = CIMultiDict(headers)
        async with self.session.request(method, self.admin(path), **kwargs) as response:
            data = await response.json(content_type=None) if response.status != 204 else None
            return response.status, data, response.headers

    async def proxy(self, secret: str, path: str = "/soccer/x") -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.worker.proxy_port}{path}"
        async with self.session.get(url, headers={"X-API-Key": secret}) as response:
            return response.status, await response.json(content_type=None)

    async def rotate(self, name: str, grace: str) -> dict[str, Any]:
        status, rotated, _ = await self.call("POST", f"/admin/keys/{name}/rotate", {"grace": grace})
        assert status == 200, rotated
        return dict(rotated)

    def known_version(self) -> int:
        """The version of the key store this worker has applied: moved by each of its writes."""
        return self.worker.runtime.key_store.known_version


async def create(rig: Rig, name: str, **fields: Any) -> dict[str, Any]:
    status, body, headers = await rig.call(
        "POST", "/admin/keys", {"name": name, "plans": {"soccer": "trial"}, **fields}
    )
    assert status == 201, body
    assert headers["Location"] == f"/admin/keys/{name}"
    assert headers["Cache-Control"] == "no-store"
    return dict(body)
