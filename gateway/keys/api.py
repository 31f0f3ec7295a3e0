"""The admin keys API: keys as data, next to the keys of the config file.

    POST   /admin/keys                 create (201, with the secret this once) or import
    GET    /admin/keys?after=&limit=   list by name, file and API keys together
    GET    /admin/keys/{name}          one key, without any secret
    PATCH  /admin/keys/{name}          change plans, disabled, expires
    DELETE /admin/keys/{name}          204
    POST   /admin/keys/{name}/rotate   a new secret; the old one keeps working for `grace`
    DELETE /admin/keys/{name}/previous the old secrets' graces end now (200, the key)

Each answer that gives one key carries its ETag, and PATCH, rotate and both DELETEs take
`If-Match`: 412, with nothing written, when the key changed since (gateway.keys.etags); a
GET evaluates it too.
The file's keys are read-only here (409): the file is their source of truth, and a change
made here would be undone by the next reload. Bodies are checked before anything is stored;
a mistake is a 400 whose detail starts with the field it is about, e.g. `plans.soccer: ...`.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from gateway.admin_json import ADMIN_ROUTE, json_object, only_fields, only_parameters
from gateway.config.instants import format_instant
from gateway.config.model import ApiKey, not_in_config
from gateway.keys.api_fields import (
    MAX_SECRETS_IN_GRACE,
    new_secret,
    read_boolean,
    read_expires,
    read_grace,
    read_name,
    read_page_size,
    read_plans,
    refuse_file_secret,
)
from gateway.keys.backend import WriteRefused
from gateway.keys.etags import api_key_etag, check_if_match, file_key_etag, if_match
from gateway.keys.index import KeyIndex
from gateway.keys.records import KeyRecord, PreviousSecret
from gateway.keys.store import KeyStore
from gateway.limits.base import StorageError
from gateway.problems import BadRequest, Conflict, GatewayProblem, NotFound, StorageUnavailable

if TYPE_CHECKING:
    from gateway.runtime import Snapshot


@dataclass(frozen=True, slots=True)
class KeysAccess:
    """What the keys API works on: the worker's current snapshot (its config and key index)
    and its key store."""

    get_snapshot: Callable[[], Snapshot]
    store: KeyStore


T = TypeVar("T")
log = logging.getLogger(__name__)

_CREATE_FIELDS = ("name", "plans", "disabled", "expires", "key_sha256")
_PATCH_FIELDS = ("plans", "disabled", "expires")
_ROTATE_FIELDS = ("grace", "key_sha256")
# An answer that carries a secret must not be kept by any cache on the way.
_NOT_CACHED = {"Cache-Control": "no-store"}


def add_key_routes(app: web.Application, access: KeysAccess) -> None:
    api = _KeysApi(access)
    app.router.add_post("/admin/keys", api.create, **ADMIN_ROUTE)
    app.router.add_get("/admin/keys", api.list_keys, **ADMIN_ROUTE)
    app.router.add_get("/admin/keys/{name}", api.get, **ADMIN_ROUTE)
    app.router.add_patch("/admin/keys/{name}", api.patch, **ADMIN_ROUTE)
    app.router.add_delete("/admin/keys/{name}", api.delete, **ADMIN_ROUTE)
    app.router.add_post("/admin/keys/{name}/rotate", api.rotate, **ADMIN_ROUTE)
    app.router.add_delete("/admin/keys/{name}/previous", api.end_graces, **ADMIN_ROUTE)


class _KeysApi:
    def __init__(self, access: KeysAccess, clock: Callable[[], float] = time.time) -> None:
        self._access = access
        self._store = access.store
        self._clock = clock

    async def create(self, request: web.Request) -> web.Response:
        snapshot = self._access.get_snapshot()
        config, index = snapshot.config, snapshot.keys
        only_parameters(request, ())
        data = only_fields(await json_object(request, required=True), _CREATE_FIELDS)
        if "name" not in data:
            raise BadRequest("name: is required")
        name = read_name(data["name"])
        if name in index.file_keys:
            raise Conflict(f"name: the key '{name}' is defined in the config file")
        plans = read_plans(data.get("plans", {}), config)
        disabled = read_boolean(data.get("disabled", False), "disabled")
        expires = read_expires(data.get("expires"))
        secret, digest = new_secret(data)
        refuse_file_secret(index, digest)
        now = self._clock()
        record = KeyRecord(name, digest, plans, disabled, expires, created=now, updated=now)
        try:
            await self._giving_secret(digest, lambda: self._store.create(record))
        except WriteRefused as refused:
            if refused.reason == "name_taken":
                raise Conflict(f"name: a key named '{name}' exists already") from None
            raise Conflict("key_sha256: another key has this secret") from None
        headers = {"Location": f"/admin/keys/{name}", **_NOT_CACHED}
        return self._key_answer(record, secret, status=201, headers=headers)

    async def list_keys(self, request: web.Request) -> web.Response:
        """From the key index: the keys this process enforces (while the storage is away, as
        it last told them). Before it has ever been read there is no list to give: a list of
        the file's keys alone would tell a client that every API key is gone."""
        only_parameters(request, ("after", "limit"))
        index = self._access.get_snapshot().keys
        if not index.api_keys.loaded:
            log.warning("admin keys API: the API keys are not loaded from the storage yet")
            raise StorageUnavailable()
        after = request.query.get("after", "")
        limit = read_page_size(request.query.get("limit"))
        names = _names_after(index, after, limit + 1)
        page = names[:limit]
        keys = []
        for name in page:
            file_key = index.file_keys.get(name)
            if file_key is not None:
                keys.append(self._file_json(file_key))
            else:
                keys.append(self._api_json(index.api_keys.records[name]))
        next_after = page[-1] if len(names) > limit else None
        return web.json_response({"keys": keys, "next": next_after})

    async def get(self, request: web.Request) -> web.Response:
        """The key; with `If-Match`, 412 unless it is still as the caller read it (RFC 9110
        13.1.1: an origin server evaluates it on every method, a read included)."""
        only_parameters(request, ())
        name = request.match_info["name"]
        condition = if_match(request)
        file_key = self._access.get_snapshot().keys.file_keys.get(name)
        if file_key is not None:
            etag = file_key_etag(file_key)
            if condition is not None:
                condition.require(name, etag)
            return web.json_response(self._file_json(file_key), headers={"ETag": etag})
        record = await _storing(self._store.read(name))
        if record is None:
            raise NotFound(f"No key is named '{name}'.")
        check_if_match(condition, record)
        return self._key_answer(record)

    async def patch(self, request: web.Request) -> web.Response:
        snapshot = self._access.get_snapshot()
        only_parameters(request, ())
        name = self._api_key_name(snapshot, request)
        condition = if_match(request)
        data = only_fields(await json_object(request, required=True), _PATCH_FIELDS)
        changes: dict[str, Any] = {}
        if "plans" in data:
            # Checked before the key is read, as it is in memory (a mistake is a 400 even for
            # a key the storage lacks), and again on the stored record below.
            held = snapshot.keys.api_keys.records.get(name)
            changes["plans"] = read_plans(
                data["plans"], snapshot.config, kept=None if held is None else held.plans
            )
        if "disabled" in data:
            changes["disabled"] = read_boolean(data["disabled"], "disabled")
        if "expires" in data:
            changes["expires"] = read_expires(data["expires"])
        if not changes:
            record = await _storing(self._store.read(name))
            if record is None:
                raise NotFound(f"No key is named '{name}'.")
            check_if_match(condition, record)  # nothing to write: a read is as good
            return self._key_answer(record)
        now = self._clock()

        def patched(record: KeyRecord) -> KeyRecord:
            check_if_match(condition, record)
            if "plans" in changes:
                # The entries left as they are may be those the memory did not have yet.
                read_plans(changes["plans"], snapshot.config, kept=record.plans)
            return _without_retired(dataclasses.replace(record, **changes, updated=now), now)

        _, new = await _updating(self._store, name, patched)
        return self._key_answer(new)

    async def delete(self, request: web.Request) -> web.Response:
        snapshot = self._access.get_snapshot()
        only_parameters(request, ())
        name = self._api_key_name(snapshot, request)
        condition = if_match(request)
        # Nothing a body could say changes a delete: a field in one is a mistake to name (the
        # caller meant something that would not happen), as it is for DELETE .../previous.
        only_fields(await json_object(request, required=False), ())
        try:
            await _storing(self._store.delete(name, lambda old: check_if_match(condition, old)))
        except WriteRefused as refused:
            raise _refusal(name, refused) from None
        return web.Response(status=204)

    async def rotate(self, request: web.Request) -> web.Response:
        snapshot = self._access.get_snapshot()
        only_parameters(request, ())
        name = self._api_key_name(snapshot, request)
        condition = if_match(request)
        data = only_fields(await json_object(request, required=False), _ROTATE_FIELDS)
        grace = read_grace(data.get("grace", 0))
        secret, digest = new_secret(data)
        refuse_file_secret(snapshot.keys, digest)
        now = self._clock()

        def rotated(record: KeyRecord) -> KeyRecord:
            check_if_match(condition, record)
            # A secret whose grace is over is no longer this key's: it may come back.
            record = _without_retired(record, now)
            if digest in record.digests():
                raise Conflict("key_sha256: this key has this secret already")
            previous = list(record.previous)
            if grace > 0:
                _refuse_past_the_cap(name, previous)
                previous.append(PreviousSecret(record.key_sha256, now + grace))
            return dataclasses.replace(
                record, key_sha256=digest, previous=tuple(previous), updated=now
            )

        try:
            _, new = await self._giving_secret(digest, lambda: self._store.update(name, rotated))
        except WriteRefused as refused:
            raise _refusal(name, refused) from None
        return self._key_answer(new, secret, headers=_NOT_CACHED)

    async def end_graces(self, request: web.Request) -> web.Response:
        """Every old secret still in a rotation's grace stops now (a leaked one, say); the
        current secret is untouched. A key with none is answered as it is and nothing is
        written: a retry after a lost answer, or a second operator, is no mistake."""
        snapshot = self._access.get_snapshot()
        only_parameters(request, ())
        name = self._api_key_name(snapshot, request)
        condition = if_match(request)
        only_fields(await json_object(request, required=False), ())
        now = self._clock()

        def ended(record: KeyRecord) -> KeyRecord:
            check_if_match(condition, record)
            if all(old.until <= now for old in record.previous):
                return record
            # Kept with their grace ending now rather than dropped: each is then 401 with the
            # detail of a grace that ran out, and stays this key's until it is next written.
            live = _without_retired(record, now).previous
            previous = tuple(PreviousSecret(old.key_sha256, now) for old in live)
            return dataclasses.replace(record, previous=previous, updated=now)

        _, new = await _updating(self._store, name, ended)
        return self._key_answer(new)

    async def _giving_secret(self, digest: str, write: Callable[[], Awaitable[T]]) -> T:
        """`write` (one that gives a key the secret `digest`), made once more if it was refused
        for another key's retired secret: another key holds a rotated-out secret until that
        key is written again, even after the grace is over (`_free_retired_secret`)."""
        try:
            return await _storing(write())
        except WriteRefused as refused:
            if refused.reason != "secret_taken" or not await self._free_retired_secret(digest):
                raise
        return await _storing(write())

    async def _free_retired_secret(self, digest: str) -> bool:
        """Whether the API key that holds `digest` held it only as a rotated-out secret whose
        grace is over, and has been written without it (the storage lets a secret go only
        when its key is written): then the secret may be given to a key again."""
        found = self._access.get_snapshot().keys.api_keys.secret(digest)
        now = self._clock()
        if found is None or found[1] is None or found[1] > now:
            return False
        holder = found[0].name
        try:
            await _storing(self._store.update(holder, lambda record: _without_retired(record, now)))
        except WriteRefused:
            return False  # gone meanwhile, or busy: the caller's 409 stands
        return True

    def _api_key_name(self, snapshot: Snapshot, request: web.Request) -> str:
        """The name in the path, unless it is a file key (which the API cannot change)."""
        name = request.match_info["name"]
        if name in snapshot.keys.file_keys:
            raise Conflict(f"The key '{name}' is defined in the config file; change it there.")
        return name

    def _key_answer(
        self,
        record: KeyRecord,
        secret: str | None = None,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        """The answer that gives one API key: its JSON (with `secret`, the new one to show
        this once), and its ETag for a later `If-Match`."""
        body = self._api_json(record)
        if secret is not None:
            body["key"] = secret
        etag = {"ETag": api_key_etag(record)}
        return web.json_response(body, status=status, headers={**(headers or {}), **etag})

    def _file_json(self, key: ApiKey) -> dict[str, Any]:
        return {
            **self._common_json(key.name, key.plans, key.disabled, key.expires),
            "source": "file",
            "created": None,
            "updated": None,
            "previous_key_valid_until": None,
            "previous_keys_valid_until": [],
        }

    def _api_json(self, record: KeyRecord) -> dict[str, Any]:
        now = self._clock()
        # In the order they were replaced. Rotated again within a grace, a key has several
        # old secrets: the single time is the latest (until when any of them works), which
        # is not the end of the one a shorter second grace just replaced.
        still_valid = [old.until for old in record.previous if old.until > now]
        return {
            **self._common_json(
                record.name, record.plans, record.disabled, record.expires, record.plan_names()
            ),
            "source": "api",
            "created": format_instant(record.created),
            "updated": format_instant(record.updated),
            "previous_key_valid_until": format_instant(max(still_valid)) if still_valid else None,
            "previous_keys_valid_until": [format_instant(until) for until in still_valid],
        }

    def _common_json(
        self, name: str, plans: Any, disabled: bool, expires: float | None, names: Any = None
    ) -> dict[str, Any]:
        """`names`: product -> plan name, when `plans` (as given, overrides and all) is not
        that already."""
        config = self._access.get_snapshot().config
        return {
            "name": name,
            "plans": dict(plans),
            # The entries a reload left without their product or plan (an API key's only):
            # kept as data, so that the operator sees what to change.
            "not_in_config": not_in_config(
                plans if names is None else names, config.products, config.plans
            ),
            "disabled": disabled,
            "expires": None if expires is None else format_instant(expires),
            "expired": expires is not None and self._clock() >= expires,
        }


def _names_after(index: KeyIndex, after: str, count: int) -> list[str]:
    """Up to `count` names of file and API keys after `after`, in order, each once."""
    file_names = index.file_names
    start = bisect.bisect_right(file_names, after)
    from_file = file_names[start : start + count]
    # A name in both is listed once (as the file's): ask the API side for enough extra.
    from_api = index.api_keys.names_after(after, count + len(from_file))
    return list(_unique(heapq.merge(from_file, from_api)))[:count]


def _unique(names: Iterable[str]) -> Iterable[str]:
    last = None
    for name in names:
        if name != last:
            yield name
            last = name


def _refuse_past_the_cap(name: str, in_grace: list[PreviousSecret]) -> None:
    """Refuse a rotation with a grace of a key with MAX_SECRETS_IN_GRACE old secrets in one
    already. Refused rather than ending the oldest grace to make room: a rotation job would
    then cut off the clients still on that secret without a word, where a 409 stops the job
    and says what to do. A rotation with no grace adds no old secret, and is not refused."""
    if len(in_grace) < MAX_SECRETS_IN_GRACE:
        return
    first_end = format_instant(min(old.until for old in in_grace))
    raise Conflict(
        f"The key '{name}' has {len(in_grace)} old secrets in a rotation's grace, the most a "
        f"key keeps. End their graces first (DELETE /admin/keys/{name}/previous), or rotate "
        f"after {first_end}, when the first of them ends."
    )


def _without_retired(record: KeyRecord, now: float) -> KeyRecord:
    """`record` without the rotated-out secrets whose grace is over (written so, the storage
    lets them go: another key, or this one again, may take them)."""
    live = tuple(old for old in record.previous if old.until > now)
    return record if live == record.previous else dataclasses.replace(record, previous=live)


async def _storing(call: Awaitable[T]) -> T:
    try:
        return await call
    except StorageError as exc:
        # The 503 says only "try again"; what the storage said (OOM, NOREPLICAS, a timeout)
        # is for the operator.
        log.warning("admin keys API: %s", exc)
        raise StorageUnavailable() from exc


async def _updating(
    store: KeyStore, name: str, change: Callable[[KeyRecord], KeyRecord]
) -> tuple[KeyRecord, KeyRecord]:
    try:
        return await _storing(store.update(name, change))
    except WriteRefused as refused:
        raise _refusal(name, refused) from None


def _refusal(name: str, refused: WriteRefused) -> GatewayProblem:
    """The answer to a refused change of the key `name` (PATCH, rotate, DELETE)."""
    if refused.reason == "not_found":
        return NotFound(f"No key is named '{name}'.")
    if refused.reason == "changed":
        return Conflict(f"The key '{name}' kept being changed by other calls meanwhile; try again.")
    return Conflict("key_sha256: another key has this secret")
