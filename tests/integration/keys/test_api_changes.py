"""The admin keys API on a real gateway (one process, memory:// storage unless said otherwise; the
rig fixture): changing, disabling, expiring, deleting and rotating keys, and the secrets a
rotation keeps for its grace.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from gateway.config.instants import format_instant
from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.keys_api_rig import API, Rig, create
from tests.support.upstream import running_upstream


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
