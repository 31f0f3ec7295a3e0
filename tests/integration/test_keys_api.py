"""The admin keys API on a real gateway (one process, memory:// storage): what it accepts,
what it refuses and how, and what the proxy port makes of the keys it creates."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config.instants import format_instant
from gateway.server import Worker
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.redis_servers import RedisServer
from tests.support.sockets import closed_port
from tests.support.upstream import running_upstream

# The digest of an empty key, which no request presents (an empty key is no key).
EMPTY_KEY_SHA256 = hashlib.sha256(b"").hexdigest()

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

    async def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with self.session.request(method, self.admin(path), **kwargs) as response:
            data = await response.json(content_type=None) if response.status != 204 else None
            return response.status, data, response.headers

    async def proxy(self, secret: str, path: str = "/soccer/x") -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.worker.proxy_port}{path}"
        async with self.session.get(url, headers={"X-API-Key": secret}) as response:
            return response.status, await response.json(content_type=None)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with running_upstream() as upstream:
        config = write_config(
            tmp_path / "config", API.format(upstream=upstream.url), server=worker_server_yaml()
        )
        async with running_gateway(config) as worker, aiohttp.ClientSession() as session:
            yield Rig(worker, session)


async def create(rig: Rig, name: str, **fields: Any) -> dict[str, Any]:
    status, body, headers = await rig.call(
        "POST", "/admin/keys", {"name": name, "plans": {"soccer": "trial"}, **fields}
    )
    assert status == 201, body
    assert headers["Location"] == f"/admin/keys/{name}"
    assert headers["Cache-Control"] == "no-store"
    return dict(body)


# --- create, read, list ----------------------------------------------------------------------


async def test_create_shows_the_secret_once_and_it_works_at_once(rig: Rig) -> None:
    created = await create(rig, "acme", expires="2099-01-01T00:00:00+01:00")

    secret = created.pop("key")
    assert len(secret) >= 40
    assert created["name"] == "acme" and created["source"] == "api"
    assert created["plans"] == {"soccer": "trial"} and created["disabled"] is False
    assert created["expires"] == "2098-12-31T23:00:00Z" and created["expired"] is False
    status, _ = await rig.proxy(secret)
    assert status == 200
    status, fetched, _ = await rig.call("GET", "/admin/keys/acme")
    assert status == 200 and "key" not in fetched and "key_sha256" not in fetched
    assert fetched == created
    # The key is counted under its name, like a file key: the usage API knows it.
    status, usage, _ = await rig.call("GET", "/admin/usage/acme")
    assert status == 200 and usage["products"]["soccer"]["plan"] == "trial"


async def test_import_by_digest_returns_no_secret(rig: Rig) -> None:
    digest = hashlib.sha256(b"made-elsewhere").hexdigest().upper()
    created = await create(rig, "imported", key_sha256=digest)
    assert "key" not in created
    assert (await rig.proxy("made-elsewhere"))[0] == 200
    assert (await rig.proxy("made-elsewhere", "/weather/x"))[0] == 403


async def test_list_pages_by_name_over_file_and_api_keys(rig: Rig) -> None:
    for name in ("b", "d", "z.last", "a"):
        await create(rig, name)
    seen: list[str] = []
    sources: dict[str, str] = {}
    after = ""
    pages = 0
    while True:
        status, page, _ = await rig.call("GET", f"/admin/keys?limit=2&after={after}")
        assert status == 200 and len(page["keys"]) <= 2
        pages += 1
        seen += [key["name"] for key in page["keys"]]
        sources |= {key["name"]: key["source"] for key in page["keys"]}
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == ["a", "b", "d", "file-key", "m-file-key", "z.last"]
    assert pages == 3
    assert sources["file-key"] == "file" and sources["a"] == "api"
    status, everything, _ = await rig.call("GET", "/admin/keys")
    assert [key["name"] for key in everything["keys"]] == seen and everything["next"] is None
    assert all("key" not in key for key in everything["keys"])


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        # Misspelt, it was left out: the first page of every key, as if asked for.
        ("?afer=b&limit=2", "afer: unknown parameter (allowed: after, limit)"),
        ("?after=a&after=z", "after: given twice"),
        ("?limit=1&limit=1000", "limit: given twice"),
    ],
)
async def test_a_list_query_is_taken_as_it_says_or_refused(
    rig: Rig, query: str, detail: str
) -> None:
    status, problem, _ = await rig.call("GET", f"/admin/keys{query}")
    assert (status, problem["code"], problem["detail"]) == (400, "bad_request", detail)


async def test_file_key_shows_its_expiry(rig: Rig) -> None:
    status, key, _ = await rig.call("GET", "/admin/keys/m-file-key")
    assert status == 200
    assert key["source"] == "file" and key["expires"] == "2020-01-01T00:00:00Z"
    assert key["expired"] is True


# --- change, delete, rotate ------------------------------------------------------------------


async def test_disable_then_enable_then_delete(rig: Rig) -> None:
    secret = (await create(rig, "acme"))["key"]

    status, patched, _ = await rig.call("PATCH", "/admin/keys/acme", {"disabled": True})
    assert status == 200 and patched["disabled"] is True
    status, problem = await rig.proxy(secret)
    assert status == 403 and problem["detail"] == "The API key 'acme' is disabled."

    status, patched, _ = await rig.call(
        "PATCH", "/admin/keys/acme", {"disabled": False, "plans": {"weather": "production"}}
    )
    assert status == 200 and patched["plans"] == {"weather": "production"}
    assert (await rig.proxy(secret, "/weather/x"))[0] == 200
    assert (await rig.proxy(secret))[0] == 403

    status, _, _ = await rig.call("DELETE", "/admin/keys/acme")
    assert status == 204
    status, problem = await rig.proxy(secret, "/weather/x")
    assert status == 401 and problem["detail"] == "The API key is not valid."
    assert (await rig.call("GET", "/admin/keys/acme"))[0] == 404
    assert (await rig.call("DELETE", "/admin/keys/acme"))[0] == 404
    # The name and the secret are free again.
    assert (await create(rig, "acme"))["name"] == "acme"


async def test_expiry_is_401_saying_so(rig: Rig) -> None:
    soon = time.time() + 0.4
    secret = (await create(rig, "brief", expires=format_instant(soon + 1)))["key"]
    precise = datetime.fromtimestamp(soon, UTC).isoformat(timespec="milliseconds")
    status, patched, _ = await rig.call("PATCH", "/admin/keys/brief", {"expires": precise})
    assert status == 200 and patched["expires"] == format_instant(soon)
    assert (await rig.proxy(secret))[0] == 200
    await asyncio.sleep(max(0.0, soon - time.time()) + 0.05)

    status, problem = await rig.proxy(secret)
    assert status == 401
    assert problem["detail"] == f"The API key 'brief' expired at {format_instant(soon)}."
    # File keys expire too.
    status, problem = await rig.proxy("m-file-secret")
    assert status == 401
    assert problem["detail"] == "The API key 'm-file-key' expired at 2020-01-01T00:00:00Z."
    # Clearing `expires` brings the key back.
    assert (await rig.call("PATCH", "/admin/keys/brief", {"expires": None}))[0] == 200
    assert (await rig.proxy(secret))[0] == 200


async def test_rotation_keeps_the_old_secret_for_the_grace_only(rig: Rig) -> None:
    old = (await create(rig, "acme"))["key"]

    status, rotated, _ = await rig.call("POST", "/admin/keys/acme/rotate", {"grace": "400ms"})
    assert status == 200
    new = rotated.pop("key")
    assert new != old and rotated["name"] == "acme"
    assert rotated["previous_key_valid_until"] is not None
    assert (await rig.proxy(old))[0] == 200
    assert (await rig.proxy(new))[0] == 200
    # Both secrets are one key: one rate limit, one quota, one name in the access log.
    await asyncio.sleep(0.45)
    status, problem = await rig.proxy(old)
    assert status == 401 and "rotation" in problem["detail"]
    assert (await rig.proxy(new))[0] == 200

    # Without a grace the old secret stops at once.
    status, again, _ = await rig.call("POST", "/admin/keys/acme/rotate")
    assert status == 200 and again["previous_key_valid_until"] is None
    assert (await rig.proxy(new))[0] == 401
    assert (await rig.proxy(again["key"]))[0] == 200


async def test_a_second_rotation_within_the_grace_tells_each_old_secrets_end(rig: Rig) -> None:
    """Rotated again with a shorter grace, the answer said only the first old secret's end (the
    latest): read as that of the secret just replaced, it promised its clients 50 minutes too
    many."""
    first = (await create(rig, "twice"))["key"]
    before = time.time()
    status, once, _ = await rig.call("POST", "/admin/keys/twice/rotate", {"grace": "1h"})
    assert status == 200
    status, again, _ = await rig.call("POST", "/admin/keys/twice/rotate", {"grace": "10m"})
    after = time.time()
    assert status == 200
    hour, ten_minutes = once["previous_key_valid_until"], again["previous_keys_valid_until"][1]
    assert format_instant(before + 3600) <= hour <= format_instant(after + 3600)
    assert format_instant(before + 600) <= ten_minutes <= format_instant(after + 600)
    # In the order the secrets were replaced: the last is the one this rotation replaced.
    assert again["previous_keys_valid_until"] == [hour, ten_minutes]
    assert again["previous_key_valid_until"] == hour  # until when any old secret works
    status, read, _ = await rig.call("GET", "/admin/keys/twice")
    assert read["previous_keys_valid_until"] == [hour, ten_minutes]
    assert (await rig.proxy(first))[0] == 200 and (await rig.proxy(once["key"]))[0] == 200
    # Without a grace nothing is added; the earlier old secrets keep theirs.
    status, third, _ = await rig.call("POST", "/admin/keys/twice/rotate")
    assert third["previous_keys_valid_until"] == [hour, ten_minutes]
    assert (await rig.proxy(again["key"]))[0] == 401
    status, listed, _ = await rig.call("GET", "/admin/keys?after=twh&limit=1")
    assert listed["keys"][0]["previous_keys_valid_until"] == [hour, ten_minutes]
    assert (await rig.call("GET", "/admin/keys/file-key"))[1]["previous_keys_valid_until"] == []


@pytest.fixture(params=["memory", "redis"])
async def any_rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    """A rig on memory://, or on the session's redis-server (whose write.lua keeps the
    secrets' owners)."""
    storage = "memory://"
    if request.param == "redis":
        storage = request.getfixturevalue("redis_server").url
    async with running_upstream() as upstream:
        config = write_config(
            tmp_path / "config",
            API.format(upstream=upstream.url),
            server=worker_server_yaml(storage_url=storage),
        )
        async with running_gateway(config) as worker, aiohttp.ClientSession() as session:
            yield Rig(worker, session)


async def test_a_secret_whose_grace_is_over_may_be_used_again(any_rig: Rig) -> None:
    """A rotated-out secret whose grace is over is no key's: it may go to another key, or
    back to its own (both were refused, the latter with a 409 saying the key had it still)."""
    rig = any_rig
    suffix = uuid.uuid4().hex[:8]  # the session's Redis outlives the test
    first, second, third = (f"{name}-{suffix}" for name in ("first", "second", "third"))
    passed_on, own = f"passed-on-{suffix}", f"own-{suffix}"

    await create(rig, first, key_sha256=hashlib.sha256(passed_on.encode()).hexdigest())
    rotate = f"/admin/keys/{first}/rotate"
    assert (await rig.call("POST", rotate, {"grace": "300ms"}))[0] == 200
    body = {
        "name": second,
        "plans": {"soccer": "trial"},
        "key_sha256": hashlib.sha256(passed_on.encode()).hexdigest(),
    }
    status, problem, _ = await rig.call("POST", "/admin/keys", body)
    assert (status, problem["detail"]) == (409, "key_sha256: another key has this secret")
    await asyncio.sleep(0.35)
    assert (await rig.proxy(passed_on))[0] == 401
    assert (await rig.call("POST", "/admin/keys", body))[0] == 201
    assert (await rig.proxy(passed_on))[0] == 200
    status, was_first, _ = await rig.call("GET", f"/admin/keys/{first}")
    assert status == 200 and was_first["previous_key_valid_until"] is None

    own_digest = {"key_sha256": hashlib.sha256(own.encode()).hexdigest()}
    await create(rig, third, **own_digest)
    rotate = f"/admin/keys/{third}/rotate"
    assert (await rig.call("POST", rotate, {"grace": "300ms"}))[0] == 200
    status, problem, _ = await rig.call("POST", rotate, own_digest)
    assert (status, problem["detail"]) == (409, "key_sha256: this key has this secret already")
    await asyncio.sleep(0.35)
    assert (await rig.call("POST", rotate, own_digest))[0] == 200
    assert (await rig.proxy(own))[0] == 200


async def test_both_secrets_of_a_rotation_share_one_rate_limit(tmp_path: Path) -> None:
    async with running_upstream() as upstream:
        body = API.format(upstream=upstream.url).replace(
            "trial: {rate: {limit: 100, per: second}}", "trial: {rate: {limit: 4, per: minute}}"
        )
        config = write_config(tmp_path / "config", body, server=worker_server_yaml())
        async with running_gateway(config) as worker, aiohttp.ClientSession() as session:
            rig = Rig(worker, session)
            old = (await create(rig, "acme"))["key"]
            new = (await rig.call("POST", "/admin/keys/acme/rotate", {"grace": "1h"}))[1]["key"]
            statuses = [(await rig.proxy(secret))[0] for secret in (old, new, old, new, old, new)]
    assert statuses == [200, 200, 200, 200, 429, 429]


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"plans": {}}, "name: is required"),
        ({"name": ""}, "name: must be 1-64 characters"),
        ({"name": "a" * 65}, "name: must be 1-64 characters"),
        ({"name": "has space"}, "name: must be 1-64 characters"),
        ({"name": "."}, "name: must be 1-64 characters"),
        ({"name": ".."}, "name: must be 1-64 characters"),
        ({"name": 7}, "name: must be 1-64 characters"),
        ({"name": "x", "plans": {"cricket": "trial"}}, "plans.cricket: unknown product"),
        ({"name": "x", "plans": {"soccer": "gold"}}, "plans.soccer: unknown plan 'gold'"),
        ({"name": "x", "plans": ["soccer"]}, "plans: must be a mapping"),
        ({"name": "x", "plans": {"soccer": 1}}, "plans.soccer: must be a string"),
        ({"name": "x", "expires": "tomorrow"}, "expires: must be an RFC 3339 time"),
        ({"name": "x", "expires": "2027-01-01T00:00:00"}, "expires: must be an RFC 3339 time"),
        ({"name": "x", "expires": 1798761600}, "expires: must be an RFC 3339 time"),
        ({"name": "x", "expires": "9999-12-31T23:59:59-12:00"}, "expires: must be between"),
        ({"name": "x", "expires": "0001-01-01T00:00:00+01:00"}, "expires: must be between"),
        ({"name": "x", "expires": "1969-12-31T23:59:59Z"}, "expires: must be between"),
        ({"name": "x", "disabled": "yes"}, "disabled: must be true or false"),
        ({"name": "x", "key_sha256": "abc"}, "key_sha256: must be 64 hexadecimal characters"),
        ({"name": "x", "key_sha256": EMPTY_KEY_SHA256}, "key_sha256: is the SHA-256 of an empty"),
        ({"name": "x", "key": "mine"}, "key: unknown field (allowed: name, plans,"),
    ],
)
async def test_create_refuses_with_the_field_named(
    rig: Rig, body: dict[str, Any], detail: str
) -> None:
    status, problem, headers = await rig.call("POST", "/admin/keys", body)
    assert status == 400, problem
    assert headers["Content-Type"] == "application/problem+json"
    assert problem["code"] == "bad_request" and problem["detail"].startswith(detail)
    assert (await rig.call("GET", "/admin/keys/x"))[0] == 404


async def test_many_mistakes_are_named_up_to_twenty_and_the_rest_counted(rig: Rig) -> None:
    """40,000 unknown products in a body under 1 MiB made a 2.6 MB answer."""
    plans = {f"p{i}": "trial" for i in range(5000)}
    status, problem, _ = await rig.call("POST", "/admin/keys", {"name": "x", "plans": plans})
    assert status == 400
    named = problem["detail"].split("; ")
    assert len(named) == 21 and named[0].startswith("plans.p0: unknown product")
    assert named[-1] == "and 4980 more"


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b"{not json", "body: not valid JSON"),
        (b"[1]", "body: must be a JSON object"),
        (b"", "body: not valid JSON"),
        # Past what Python's json reads: a RecursionError and a ValueError, once 500s.
        (b"[" * 100_000 + b"]" * 100_000, "body: nested too deeply"),
        (b'{"name": "big", "expires": ' + b"9" * 5000 + b"}", "body: a number in it is too long"),
        # Which of two values counts is each parser's own choice: a body saying both is refused.
        (b'{"name": "d1", "name": "d2"}', "name: given twice"),
        (b'{"plans": {"soccer": "trial", "soccer": "pro"}}', "soccer: given twice"),
        # A lone surrogate, which JSON can say and UTF-8 cannot: quoted back, not a 500.
        (b'{"\\ud800": 1}', "\ud800: unknown field"),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_400(rig: Rig, raw: bytes, detail: str) -> None:
    status, problem, _ = await rig.call("POST", "/admin/keys", raw=raw)
    assert status == 400 and problem["detail"].startswith(detail)
    await create(rig, "acme")
    status, problem, _ = await rig.call("PATCH", "/admin/keys/acme", raw=raw)
    assert status == 400 and problem["detail"].startswith(detail)


async def test_a_body_over_a_mebibyte_is_413_problem(rig: Rig) -> None:
    body = io.BytesIO(b" " * (1024 * 1024 + 1))
    async with rig.session.post(rig.admin("/admin/keys"), data=body) as response:
        assert response.headers["Content-Type"] == "application/problem+json"
        problem = await response.json(content_type=None)
    assert (response.status, problem["code"]) == (413, "content_too_large")
    assert problem["detail"].startswith("body: over the 1048576 bytes")


async def test_a_body_over_a_mebibyte_is_413_on_calls_that_read_none(rig: Rig) -> None:
    """The limit held only where a body was read: a DELETE with 2 MB deleted the key."""
    await create(rig, "acme")
    body = io.BytesIO(b" " * (2 * 1024 * 1024))
    async with rig.session.delete(rig.admin("/admin/keys/acme"), data=body) as response:
        problem = await response.json(content_type=None)
    assert (response.status, problem["code"]) == (413, "content_too_large")
    status, _, _ = await rig.call("GET", "/admin/keys/acme")
    assert status == 200  # still there


async def test_patch_and_rotate_refuse_bad_fields(rig: Rig) -> None:
    await create(rig, "acme")
    cases = [
        ("PATCH", "/admin/keys/acme", {"name": "other"}, "name: unknown field"),
        ("PATCH", "/admin/keys/acme", {"expires": "soon"}, "expires: must be"),
        ("PATCH", "/admin/keys/acme", {"plans": {"soccer": "gold"}}, "plans.soccer: unknown plan"),
        ("POST", "/admin/keys/acme/rotate", {"grace": "forever"}, "grace: must be a duration"),
        ("POST", "/admin/keys/acme/rotate", {"grace": -1}, "grace: must be a duration"),
        ("POST", "/admin/keys/acme/rotate", {"grace": "99999999999999h"}, "grace: must be at most"),
    ]
    for method, path, body, detail in cases:
        status, problem, _ = await rig.call(method, path, body)
        assert status == 400 and problem["detail"].startswith(detail), (body, problem)
    # '²' and a fullwidth '1' are digits to str.isdigit(), not to the API.
    for limit in ("0", "%C2%B2", "%EF%BC%91", "1001"):
        status, problem, _ = await rig.call("GET", f"/admin/keys?limit={limit}")
        assert status == 400 and problem["detail"].startswith("limit: must be an integer")
    # Nothing of those was stored: the key still reads, and so does the list.
    assert (await rig.call("GET", "/admin/keys/acme"))[0] == 200
    assert (await rig.call("GET", "/admin/keys"))[0] == 200


async def test_conflicts_are_409(rig: Rig) -> None:
    await create(rig, "acme")
    taken = [
        ("POST", "/admin/keys", {"name": "acme"}, "name: a key named 'acme' exists already"),
        ("POST", "/admin/keys", {"name": "file-key"}, "name: the key 'file-key' is defined"),
        (
            "POST",
            "/admin/keys",
            {"name": "copycat", "key_sha256": hashlib.sha256(b"file-secret").hexdigest()},
            "key_sha256: a key of the config file has this secret",
        ),
        ("PATCH", "/admin/keys/file-key", {"disabled": True}, "The key 'file-key' is defined"),
        ("DELETE", "/admin/keys/file-key", None, "The key 'file-key' is defined in the config"),
        ("POST", "/admin/keys/file-key/rotate", None, "The key 'file-key' is defined"),
    ]
    for method, path, body, detail in taken:
        status, problem, _ = await rig.call(method, path, body)
        assert status == 409 and problem["code"] == "conflict", (path, problem)
        assert problem["detail"].startswith(detail), problem
    digest = hashlib.sha256(b"shared").hexdigest()
    await create(rig, "first", key_sha256=digest)
    status, problem, _ = await rig.call(
        "POST", "/admin/keys", {"name": "second", "key_sha256": digest}
    )
    assert status == 409 and problem["detail"] == "key_sha256: another key has this secret"
    assert (await rig.proxy("file-secret"))[0] == 200  # the file key is untouched


async def test_unknown_keys_are_404(rig: Rig) -> None:
    for method, path in (
        ("GET", "/admin/keys/ghost"),
        ("PATCH", "/admin/keys/ghost"),
        ("DELETE", "/admin/keys/ghost"),
        ("POST", "/admin/keys/ghost/rotate"),
    ):
        status, problem, _ = await rig.call(
            method, path, {"disabled": True} if method == "PATCH" else None
        )
        assert status == 404 and problem["code"] == "not_found", (method, problem)


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
