"""The admin keys API's ETags and `If-Match` on a real gateway (memory:// and a real Redis, the
any_rig fixture; two gateways sharing one Redis for calls that race): a change made only if the
key is still as the caller read it, checked inside the store's atomic write.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.key_store import HONOURED_WITHIN, until
from tests.support.keys_api_rig import API, Rig, create
from tests.support.redis_servers import RedisServer
from tests.support.upstream import running_upstream


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # the session's Redis outlives the test


def if_match(*tags: str) -> list[tuple[str, str]]:
    return [("If-Match", ", ".join(tags))]


def assert_precondition_failed(status: int, problem: Any, current_etag: str) -> None:
    assert status == 412, problem
    assert problem["type"] == "about:blank" and problem["title"] == "Precondition Failed"
    assert problem["status"] == 412 and problem["code"] == "precondition_failed"
    assert problem["detail"].startswith("If-Match: ") and current_etag in problem["detail"]


async def etag_of(rig: Rig, name: str) -> str:
    status, _, headers = await rig.call("GET", f"/admin/keys/{name}")
    assert status == 200
    return str(headers["ETag"])


async def test_two_rotations_from_one_read_the_second_is_412(any_rig: Rig) -> None:
    """Both rotations were 200: the second, with no grace, made the first one's new secret dead
    at once, and its caller handed a dead secret to its customer."""
    rig = any_rig
    name = unique("acme")
    await create(rig, name)
    read = await etag_of(rig, name)

    status, first, headers = await rig.call(
        "POST", f"/admin/keys/{name}/rotate", headers=if_match(read)
    )
    assert status == 200, first
    after_first = headers["ETag"]
    assert after_first != read
    version = rig.known_version()
    status, problem, _ = await rig.call(
        "POST", f"/admin/keys/{name}/rotate", headers=if_match(read)
    )
    assert_precondition_failed(status, problem, after_first)
    assert "key" not in problem
    assert rig.known_version() == version  # nothing written
    assert (await rig.proxy(first["key"]))[0] == 200
    assert await etag_of(rig, name) == after_first


@asynccontextmanager
async def two_gateways(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[Rig, Rig]]:
    """Two gateways sharing one Redis: each with its own key store, as two processes have."""
    async with AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(running_upstream())
        session = await stack.enter_async_context(aiohttp.ClientSession())
        rigs = []
        for number in (1, 2):
            config = write_config(
                tmp_path / f"config{number}",
                API.format(upstream=upstream.url),
                server=worker_server_yaml(storage_url=redis_url),
            )
            rigs.append(Rig(await stack.enter_async_context(running_gateway(config)), session))
        yield rigs[0], rigs[1]


async def test_racing_rotations_with_one_etag_one_wins(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Rotations sent at once, through two gateways, with the ETag of one read: one is made and
    the other is 412, however they meet (a check on a read before the write let both pass)."""
    async with two_gateways(redis_server.url, tmp_path) as (one, other):
        for _ in range(5):
            name = unique("raced")
            await create(one, name)
            read = await etag_of(one, name)
            path = f"/admin/keys/{name}/rotate"
            answers = await asyncio.gather(
                *(rig.call("POST", path, headers=if_match(read)) for rig in (one, other, one))
            )
            statuses = sorted(status for status, _, _ in answers)
            assert statuses == [200, 412, 412], answers
            winner = next(body for status, body, _ in answers if status == 200)
            for status, body, _ in answers:
                if status == 412:
                    assert_precondition_failed(status, body, await etag_of(one, name))
            assert (await one.proxy(winner["key"]))[0] == 200
            await until(
                lambda: (
                    other.worker.runtime.key_store.known_version
                    == one.worker.runtime.key_store.known_version
                ),
                HONOURED_WITHIN,
                "the other gateway following the rotation",
            )
            assert (await other.proxy(winner["key"]))[0] == 200


async def test_a_mismatched_if_match_writes_nothing(any_rig: Rig) -> None:
    rig = any_rig
    name = unique("kept")
    secret = (await create(rig, name))["key"]
    status, _, headers = await rig.call(
        "POST", f"/admin/keys/{name}/rotate", {"grace": "1h"}, headers=if_match("*")
    )
    assert status == 200
    current = headers["ETag"]
    status, before, _ = await rig.call("GET", f"/admin/keys/{name}")
    version = rig.known_version()
    stale = '"0123456789abcdef0123456789abcdef"'
    # A weak ETag never matches, not even the current one's: If-Match compares strongly.
    for tags in ((stale,), (f"W/{current}",), (stale, f"W/{current}")):
        for method, path, body in (
            ("PATCH", f"/admin/keys/{name}", {"disabled": True}),
            ("PATCH", f"/admin/keys/{name}", {}),
            ("DELETE", f"/admin/keys/{name}", None),
            ("DELETE", f"/admin/keys/{name}/previous", None),
            ("POST", f"/admin/keys/{name}/rotate", None),
        ):
            status, problem, _ = await rig.call(method, path, body, headers=if_match(*tags))
            assert_precondition_failed(status, problem, current)
    assert rig.known_version() == version
    status, after, headers = await rig.call("GET", f"/admin/keys/{name}")
    assert (after, headers["ETag"]) == (before, current)
    assert (await rig.proxy(secret))[0] == 200  # the old secret's grace was not ended

    # One of several ETags matching is enough; the change then moves the ETag on.
    status, patched, headers = await rig.call(
        "PATCH", f"/admin/keys/{name}", {"disabled": True}, headers=if_match(stale, current)
    )
    assert status == 200 and patched["disabled"] is True
    status, problem, _ = await rig.call("DELETE", f"/admin/keys/{name}", headers=if_match(current))
    assert_precondition_failed(status, problem, headers["ETag"])
    assert (await rig.call("GET", f"/admin/keys/{name}"))[0] == 200
    status, _, _ = await rig.call(
        "DELETE", f"/admin/keys/{name}", headers=if_match(headers["ETag"])
    )
    assert status == 204


async def test_a_star_matches_any_key_there_is(any_rig: Rig) -> None:
    rig = any_rig
    name = unique("star")
    await create(rig, name)
    star = if_match("*")
    status, patched, _ = await rig.call(
        "PATCH", f"/admin/keys/{name}", {"disabled": True}, headers=star
    )
    assert status == 200 and patched["disabled"] is True
    assert (await rig.call("POST", f"/admin/keys/{name}/rotate", headers=star))[0] == 200
    assert (await rig.call("DELETE", f"/admin/keys/{name}/previous", headers=star))[0] == 200
    assert (await rig.call("DELETE", f"/admin/keys/{name}", headers=star))[0] == 204
    # No key: 404 as without If-Match (a condition is not evaluated on an answer that is no
    # success anyway); and a file key stays 409, whatever the condition.
    assert (await rig.call("DELETE", f"/admin/keys/{name}", headers=star))[0] == 404
    assert (await rig.call("PATCH", f"/admin/keys/{name}", {}, headers=star))[0] == 404
    file_etag = await etag_of(rig, "file-key")
    for tags in (("*",), (file_etag,), ('"other"',)):
        status, problem, _ = await rig.call(
            "PATCH", "/admin/keys/file-key", {"disabled": True}, headers=if_match(*tags)
        )
        assert status == 409, problem


async def test_a_read_with_if_match_is_412_once_the_key_changed(any_rig: Rig) -> None:
    """GET evaluates If-Match as every method does (RFC 9110 13.1.1): it was ignored, and a
    caller checking that its copy of a key is current was told it was."""
    rig = any_rig
    name = unique("reader")
    await create(rig, name)
    read = await etag_of(rig, name)
    path = f"/admin/keys/{name}"
    for tags in ((read,), ('"other"', read), ("*",)):
        assert (await rig.call("GET", path, headers=if_match(*tags)))[0] == 200
    status, _, headers = await rig.call("PATCH", path, {"disabled": True})
    assert status == 200
    status, problem, _ = await rig.call("GET", path, headers=if_match(read))
    assert_precondition_failed(status, problem, headers["ETag"])
    status, problem, _ = await rig.call("GET", path, headers=[("If-Match", "unquoted")])
    assert status == 400 and problem["detail"].startswith("If-Match: must be * or one or more")
    # A file key's ETag, the same way; a key that does not exist is 404 whatever the header.
    file_etag = await etag_of(rig, "file-key")
    assert (await rig.call("GET", "/admin/keys/file-key", headers=if_match(file_etag)))[0] == 200
    status, problem, _ = await rig.call("GET", "/admin/keys/file-key", headers=if_match(read))
    assert_precondition_failed(status, problem, file_etag)
    assert (await rig.call("GET", f"{path}-gone", headers=if_match("*")))[0] == 404


async def test_a_malformed_if_match_is_400_naming_the_header(rig: Rig) -> None:
    name = unique("strict")
    await create(rig, name)
    etag = await etag_of(rig, name)
    version = rig.known_version()
    for lines in (
        [("If-Match", etag.strip('"'))],  # no quotes
        [("If-Match", f"{etag} {etag}")],  # no comma between
        [("If-Match", "")],
        [("If-Match", " , ")],
        [("If-Match", f"*, {etag}")],
        [("If-Match", "*"), ("If-Match", etag)],
        [("If-Match", f"w/{etag}")],  # the weak prefix is W/
        [("If-Match", f'"{etag}"')],
    ):
        for method, path in (("PATCH", f"/admin/keys/{name}"), ("DELETE", f"/admin/keys/{name}")):
            status, problem, _ = await rig.call(method, path, {"disabled": True}, headers=lines)
            assert status == 400, (lines, problem)
            assert problem["title"] == "Bad Request"
            assert problem["detail"].startswith("If-Match: must be * or one or more ETags")
    assert rig.known_version() == version
    # Valid lists: a comma inside the quotes, empty elements, one ETag a line.
    path = f"/admin/keys/{name}"
    status, problem, _ = await rig.call("PATCH", path, {}, headers=[("If-Match", '"a,b"')])
    assert_precondition_failed(status, problem, etag)
    status, _, headers = await rig.call(
        "PATCH", path, {"disabled": True}, headers=[("If-Match", f' , "a" ,, {etag} ,')]
    )
    assert status == 200
    lines = [("If-Match", '"a"'), ("If-Match", headers["ETag"])]
    assert (await rig.call("PATCH", path, {"disabled": False}, headers=lines))[0] == 200


async def test_every_answer_with_one_key_carries_its_etag(any_rig: Rig) -> None:
    """Each state of a key its own ETag, a write that leaves `updated` as it was (a retired
    secret dropped when another key takes it) included."""
    rig = any_rig
    name, taker, passed_on = unique("tagged"), unique("taker"), unique("secret")
    digest = hashlib.sha256(passed_on.encode()).hexdigest()
    status, _, headers = await rig.call(
        "POST", "/admin/keys", {"name": name, "plans": {"soccer": "trial"}, "key_sha256": digest}
    )
    assert status == 201
    seen = [headers["ETag"]]
    assert await etag_of(rig, name) == seen[-1]  # a read does not move it
    for method, path, body in (
        ("PATCH", f"/admin/keys/{name}", {"expires": "2099-01-01T00:00:00Z"}),
        ("POST", f"/admin/keys/{name}/rotate", {"grace": "1h"}),
        ("DELETE", f"/admin/keys/{name}/previous", None),
    ):
        status, _, headers = await rig.call(method, path, body, headers=if_match(seen[-1]))
        assert status == 200
        seen.append(headers["ETag"])
        assert await etag_of(rig, name) == seen[-1]
    assert len(set(seen)) == len(seen)
    for etag in seen:
        assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")

    # The ended grace's secret is taken by another key: the first key is written without it,
    # its `updated` untouched, and its ETag moves on.
    status, before, _ = await rig.call("GET", f"/admin/keys/{name}")
    body = {"name": taker, "plans": {"soccer": "trial"}, "key_sha256": digest}
    assert (await rig.call("POST", "/admin/keys", body))[0] == 201
    status, after, headers = await rig.call("GET", f"/admin/keys/{name}")
    assert after["updated"] == before["updated"]
    assert headers["ETag"] not in seen

    # A file key's ETag: its entry in the file, the same on every read.
    first, again = await etag_of(rig, "file-key"), await etag_of(rig, "file-key")
    assert first == again and first != await etag_of(rig, "m-file-key")


async def test_a_file_keys_etag_follows_its_entry_in_the_file(tmp_path: Path) -> None:
    async with running_upstream() as upstream:
        config_dir = write_config(
            tmp_path / "config", API.format(upstream=upstream.url), server=worker_server_yaml()
        )
        async with (
            running_gateway(config_dir, watch=True) as worker,
            aiohttp.ClientSession() as session,
        ):
            rig = Rig(worker, session)
            before, other = await etag_of(rig, "file-key"), await etag_of(rig, "m-file-key")
            edited = API.format(upstream=upstream.url).replace(
                "    key: file-secret\n", "    key: file-secret\n    disabled: true\n"
            )
            (config_dir / "10-api.yaml").write_text(edited)
            await worker.reload_now()  # a reload is read off the event loop: await it
            status, shown, headers = await rig.call("GET", "/admin/keys/file-key")
            assert status == 200 and shown["disabled"] is True
            assert headers["ETag"] != before
            assert await etag_of(rig, "m-file-key") == other  # its entry is as it was
