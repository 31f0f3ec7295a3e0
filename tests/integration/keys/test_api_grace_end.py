"""Ending a rotation's grace early (`DELETE /admin/keys/{name}/previous`) on a real gateway
worker, on memory:// and on the session's redis-server: the old secrets stop at once with the
detail of a grace that ran out, the current one is untouched, and a key with no old secret in
a grace is answered as it is without a write. (Every process honouring it within a second, on
`gateway run` with two workers: tests/integration/test_keys_e2e.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import uuid

from tests.support.keys_api_rig import Rig, create

# The detail of an old secret whose grace is over, however it came to be over.
GRACE_OVER = "The API key was replaced by a rotation; it was accepted until {until}."


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"  # the session's Redis outlives the test


async def test_every_old_secret_stops_at_once_as_if_its_grace_had_run_out(any_rig: Rig) -> None:
    rig = any_rig
    name = unique("leaky")
    first = (await create(rig, name))["key"]
    second = (await rig.rotate(name, "1h"))["key"]
    rotated = await rig.rotate(name, "10m")  # two old secrets in a grace
    current = rotated["key"]
    assert len(rotated["previous_keys_valid_until"]) == 2
    for secret in (first, second, current):
        assert (await rig.proxy(secret))[0] == 200

    status, ended, headers = await rig.call("DELETE", f"/admin/keys/{name}/previous")

    assert status == 200, ended
    assert "key" not in ended and headers["Content-Type"].startswith("application/json")
    assert ended["previous_keys_valid_until"] == [] and ended["previous_key_valid_until"] is None
    assert ended["plans"] == {"soccer": "trial"} and ended["created"] == rotated["created"]
    # The graces end at the time of the change, which is when the key was last updated.
    for secret in (first, second):
        status, problem = await rig.proxy(secret)
        assert (status, problem["detail"]) == (401, GRACE_OVER.format(until=ended["updated"]))
    assert (await rig.proxy(current))[0] == 200
    assert (await rig.call("GET", f"/admin/keys/{name}"))[1] == ended

    # The detail is the one a grace that runs out by itself gives.
    natural = await rig.rotate(name, "200ms")
    await asyncio.sleep(0.25)
    status, problem = await rig.proxy(current)
    until = natural["previous_key_valid_until"]
    assert (status, problem["detail"]) == (401, GRACE_OVER.format(until=until))


async def test_a_secret_whose_grace_was_ended_may_be_given_again(any_rig: Rig) -> None:
    rig = any_rig
    """As one whose grace ran out: it is no key's any more."""
    leaked = unique("leaked")
    digest = hashlib.sha256(leaked.encode()).hexdigest()
    name, other = unique("was"), unique("now")
    await create(rig, name, key_sha256=digest)
    await rig.rotate(name, "1h")
    status, problem, _ = await rig.call(
        "POST", "/admin/keys", {"name": other, "plans": {"soccer": "trial"}, "key_sha256": digest}
    )
    assert (status, problem["detail"]) == (409, "key_sha256: another key has this secret")

    assert (await rig.call("DELETE", f"/admin/keys/{name}/previous"))[0] == 200

    await create(rig, other, key_sha256=digest)
    assert (await rig.proxy(leaked))[0] == 200


async def test_a_key_with_no_old_secret_in_a_grace_is_answered_as_it_is_without_a_write(
    any_rig: Rig,
) -> None:
    rig = any_rig
    """A retry after a lost answer, or a second operator ending the same leak, is no mistake
    (DELETE is idempotent); and writing nothing spares every process a change to follow."""
    name = unique("plain")
    created = await create(rig, name)
    del created["key"]
    version = rig.known_version()

    status, answered, _ = await rig.call("DELETE", f"/admin/keys/{name}/previous")

    assert (status, answered) == (200, created)
    assert rig.known_version() == version

    # Twice in a row: the second call finds nothing left to end.
    await rig.rotate(name, "1h")
    assert (await rig.call("DELETE", f"/admin/keys/{name}/previous"))[0] == 200
    version = rig.known_version()
    assert (await rig.call("DELETE", f"/admin/keys/{name}/previous"))[0] == 200
    assert rig.known_version() == version


async def test_unknown_keys_file_keys_and_bodies_with_fields_are_refused(any_rig: Rig) -> None:
    rig = any_rig
    name = unique("acme")
    await create(rig, name)
    await rig.rotate(name, "1h")
    cases = [
        (f"/admin/keys/{unique('ghost')}/previous", None, 404, "not_found", "No key is named"),
        (
            "/admin/keys/file-key/previous",
            None,
            409,
            "conflict",
            "The key 'file-key' is defined in the config file; change it there.",
        ),
        (
            f"/admin/keys/{name}/previous",
            {"key_sha256": "0" * 64},
            400,
            "bad_request",
            "key_sha256: unknown field (allowed: none)",
        ),
    ]
    for path, body, status, code, detail in cases:
        answered, problem, headers = await rig.call("DELETE", path, body)
        assert (answered, problem["code"]) == (status, code), problem
        assert problem["detail"].startswith(detail), problem
        assert headers["Content-Type"] == "application/problem+json"
    # Nothing of those was ended.
    status, key, _ = await rig.call("GET", f"/admin/keys/{name}")
    assert status == 200 and len(key["previous_keys_valid_until"]) == 1
    assert (await rig.proxy("file-secret"))[0] == 200


async def test_a_rotation_with_a_grace_past_two_old_secrets_in_one_is_refused(
    any_rig: Rig,
) -> None:
    """An hourly rotation job with a 30-day grace kept ~720 live secrets for one key, each in its
    record and in every announcement of it. Two old secrets in a grace are the most; the next
    rotation with a grace is a 409 that says how to make room, and changes nothing: ending the
    oldest grace in its place would cut off that secret's clients without a word."""
    rig = any_rig
    name = unique("hourly")
    first = (await create(rig, name))["key"]
    second = (await rig.rotate(name, "720h"))["key"]
    rotated = await rig.rotate(name, "720h")
    current = rotated["key"]
    version = rig.known_version()

    status, problem, headers = await rig.call("POST", f"/admin/keys/{name}/rotate", {"grace": "1h"})

    assert (status, problem["code"]) == (409, "conflict"), problem
    assert headers["Content-Type"] == "application/problem+json"
    first_end = rotated["previous_keys_valid_until"][0]
    assert problem["detail"] == (
        f"The key '{name}' has 2 old secrets in a rotation's grace, the most a key keeps. End "
        f"their graces first (DELETE /admin/keys/{name}/previous), or rotate after {first_end}, "
        "when the first of them ends."
    )
    assert rig.known_version() == version  # nothing written
    for secret in (first, second, current):
        assert (await rig.proxy(secret))[0] == 200
    del rotated["key"]
    assert (await rig.call("GET", f"/admin/keys/{name}"))[1] == rotated

    # Room is made by ending the graces, or by one running out.
    assert (await rig.call("DELETE", f"/admin/keys/{name}/previous"))[0] == 200
    await rig.rotate(name, "720h")
    await rig.rotate(name, "200ms")
    await asyncio.sleep(0.25)
    full = await rig.rotate(name, "1h")
    assert len(full["previous_keys_valid_until"]) == 2
    # A rotation with no grace adds no old secret: never refused for them.
    last = await rig.rotate(name, "0s")
    assert last["previous_keys_valid_until"] == full["previous_keys_valid_until"]
    assert (await rig.proxy(full["key"]))[0] == 401
