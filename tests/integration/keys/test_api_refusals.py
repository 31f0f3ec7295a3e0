"""The admin keys API on a real gateway (one process, memory:// storage unless said otherwise; the
rig fixture): what it refuses and how, each field named (400, 413, 409, 404).
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest

from tests.support.keys_api_rig import Rig, create

# The digest of an empty key, which no request presents (an empty key is no key).
EMPTY_KEY_SHA256 = hashlib.sha256(b"").hexdigest()


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
        (b"", "body: is required, a JSON object"),
        (b" \r\n", "body: is required, a JSON object"),
        # Past what Python's json reads: a RecursionError and a ValueError, once 500s.
        (b"[" * 100_000 + b"]" * 100_000, "body: nested too deeply"),
        (b'{"name": "big", "expires": ' + b"9" * 5000 + b"}", "body: a number in it is too long"),
        # Which of two values counts is each parser's own choice: a body saying both is refused.
        (b'{"name": "d1", "name": "d2"}', "name: given twice"),
        # Named by its path, as every other mistake in a body is: a bare `limit` could be the
        # rate's or the quota's (or the list's parameter).
        (b'{"plans": {"soccer": "trial", "soccer": "pro"}}', "plans.soccer: given twice"),
        (
            b'{"plans": {"soccer": {"plan": "trial", "quota": {"limit": 9, "per": "day"},'
            b' "rate": {"limit": 1, "limit": 2, "per": "second"}}}}',
            "plans.soccer.rate.limit: given twice",
        ),
        (b'{"plans": {"a": [1, {"b": {"c": 1, "c": 2}}]}}', "plans.a[1].b.c: given twice"),
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


@pytest.mark.parametrize(
    ("limit", "sent_back"),
    [(5, 5.0), (1, True)],
)
async def test_an_entry_sent_back_with_a_number_of_another_type_is_refused(
    rig: Rig, limit: int, sent_back: object
) -> None:
    """A PATCH may send back a stored entry as read without its being checked again (a reload
    may have taken its plan out), but `5.0` and `true` equal Python's 5 and 1: taken for the
    entry as read, they were stored unchecked, the key's own limit could not be read back and
    the key served the plan's rate (100) while the API showed its own."""
    own = {"plan": "trial", "rate": {"limit": limit, "per": "second"}}
    await create(rig, "acme", plans={"soccer": own})
    sent = {"soccer": {"plan": "trial", "rate": {"limit": sent_back, "per": "second"}}}

    status, problem, _ = await rig.call("PATCH", "/admin/keys/acme", {"plans": sent})

    assert status == 400, problem
    assert problem["detail"] == "plans.soccer.rate.limit: must be an integer"
    status, key, _ = await rig.call("GET", "/admin/keys/acme")
    assert status == 200 and key["plans"] == {"soccer": own}
    secret = (await rig.call("POST", "/admin/keys/acme/rotate"))[1]["key"]
    url = f"http://127.0.0.1:{rig.worker.proxy_port}/soccer/x"
    async with rig.session.get(url, headers={"X-API-Key": secret}) as response:
        assert response.status == 200
        assert response.headers["X-RateLimit-Limit"] == str(limit)


@pytest.mark.parametrize(
    ("method", "path", "body", "detail"),
    [
        # The grace in the query: rotated with none, every client's secret was cut off at once.
        ("POST", "/admin/keys/acme/rotate?grace=1h", None, "grace: unknown parameter"),
        ("DELETE", "/admin/keys/acme?dry_run=true", None, "dry_run: unknown parameter"),
        ("PATCH", "/admin/keys/acme?disabled=true", {}, "disabled: unknown parameter"),
        ("GET", "/admin/keys/acme?fields=name", None, "fields: unknown parameter"),
        ("DELETE", "/admin/keys/acme/previous?name=old", None, "name: unknown parameter"),
        ("POST", "/admin/keys?name=other", {"name": "x"}, "name: unknown parameter"),
        ("DELETE", "/admin/keys/acme", {"keep_usage": True}, "keep_usage: unknown field"),
        ("DELETE", "/admin/keys/acme", b"acme", "body: not valid JSON"),
        ("DELETE", "/admin/keys/acme", [], "body: must be a JSON object"),
    ],
)
async def test_a_query_or_body_a_call_does_not_take_is_refused_and_nothing_changes(
    rig: Rig, method: str, path: str, body: Any, detail: str
) -> None:
    """Taken without them, these were made as if sent bare: a rotation with no grace, a
    delete."""
    created = await create(rig, "acme")
    raw = body if isinstance(body, bytes) else None

    status, problem, headers = await rig.call(method, path, None if raw else body, raw=raw)

    assert status == 400, problem
    assert headers["Content-Type"] == "application/problem+json"
    assert problem["code"] == "bad_request" and problem["detail"].startswith(detail), problem
    assert (await rig.proxy(created["key"]))[0] == 200  # neither rotated nor deleted
    status, key, _ = await rig.call("GET", "/admin/keys/acme")
    assert status == 200 and key["updated"] == created["updated"]
    assert (await rig.call("GET", "/admin/keys/x"))[0] == 404


async def test_a_delete_with_an_empty_body_or_object_is_made(rig: Rig) -> None:
    for name, body in (("one", None), ("two", {})):
        await create(rig, name)
        status, _, _ = await rig.call("DELETE", f"/admin/keys/{name}", body)
        assert status == 204
        assert (await rig.call("GET", f"/admin/keys/{name}"))[0] == 404
