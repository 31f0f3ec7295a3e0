"""The key store of one process: API keys written to the storage and followed from it.

Following: the process subscribes to the storage's change announcements, then reads every key
and the version they are at; from then on each announced change is applied in version order,
so the table in memory is the storage as of `known_version`. A change that arrives early (this
process's own write, or one overtaking another) waits in `_pending` for the ones before it.
Two things repair what announcements can lose: any failure of the subscription starts over,
and every `CHECK_INTERVAL` the storage's version is compared with ours. When it is behind (the
storage was emptied) the keys are read afresh; when it is ahead, it is compared again
`RECHECK_AHEAD` later (an announcement in flight arrives within milliseconds), and still ahead
means one was lost: following starts over, on a new subscription (the old one may be dead
without knowing it); so it does when a Sentinel failover has moved the master away from the
server the subscription listens on. Starting over catches up (`catch_up`): the storage logs
which key each of its newest 10,000 changes touched, so only those keys are read again, unless
the log does not reach back to our version or the store is not the one we read (its epoch
changed: it was emptied and begun again), when every key is. A change is thus honoured within
about half a second even when its announcement is lost, at 100,000 keys as at ten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

from gateway.collected import freeze_collected
from gateway.keys.backend import Change, KeyBackend, KeyWrite, Subscription, WriteRefused
from gateway.keys.operator_warnings import tell_lost, tell_not_in_config
from gateway.keys.records import KeyRecord
from gateway.keys.shadowing import SecretClashes
from gateway.keys.table import ApiKeyTable
from gateway.tasks import stop_tasks

log = logging.getLogger("gateway.keys")

CHECK_INTERVAL = 0.4
RECHECK_AHEAD = 0.1
# A restart of following after a failure waits this long at first, doubling up to the max:
# kept under a second, as a change must be honoured within one once the storage is back (at
# 2 s, changes made just after a stall waited up to 1.9 s).
_RETRY_FIRST, _RETRY_MAX = 0.1, 0.4
_TELL_EVERY = 30.0  # seconds between two warnings while following keeps failing
# More early changes than this waiting for a missing one: stop waiting, read afresh.
_MAX_PENDING = 10_000
# An admin write that keeps meeting concurrent changes of the same key gives up after this
# many attempts (409), each after a random pause of up to this many seconds per attempt made.
_WRITE_ATTEMPTS = 10
_WRITE_BACKOFF = 0.002
_CLOSE_WAIT = 2.0
# Records parsed between two turns of the event loop during a full read: a few milliseconds.
_PARSE_SLICE = 100
_FREE_SLICE = 2_000  # and records of a replaced table freed between two turns
# Records of a full read, or applied changes, frozen out of the cyclic collector at a time
# (`freeze_reads`): the collection before each freeze walks about these and what else is not
# frozen yet.
_FREEZE_SLICE = 5_000
_LISTEN_SLICE = 0.05  # seconds between two looks at whether a read taking changes is done

T = TypeVar("T")


class _Turn:
    """The rewrites of one key by this process, one at a time."""

    __slots__ = ("holders", "lock")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.holders = 0  # rewrites holding or waiting for the lock


class KeyStore:
    def __init__(self, backend: KeyBackend) -> None:
        self.table = ApiKeyTable()
        self.known_version = 0
        self._backend = backend
        self._pending: dict[int, Change] = {}
        # A read is under way: changes wait for the table it makes (honoured meanwhile on the
        # one served, see `_early`), applied in order once it is done.
        self._reading = False
        # During a read, each announced change is also honoured at once on the table being
        # served (a full read of 100,000 keys takes seconds): the newest version so applied,
        # per key, so that one overtaken by an older announcement is not undone.
        self._early: dict[str, int] = {}
        self._epoch: str | None = None  # the storage's, at our last full read (None: none yet)
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # ends `_follow` should its cancellation be lost
        self._first_attempt = asyncio.Event()
        self._turns: dict[str, _Turn] = {}  # the keys being rewritten by this process
        # A full read leaves what it made out of the cyclic collector's full collections, as
        # it goes (see `read_all`), and so do the changes followed one by one, every
        # _FREEZE_SLICE records (`_apply`). Set by a gateway worker, which runs the process's
        # collector (gateway.reload freezes each config too); off elsewhere, as in a test's
        # process, whose own live objects a freeze would keep from the collector for good.
        self.freeze_reads = False
        self._applied_unfrozen = 0  # records put in the table by `_apply` since a freeze
        # The file's keys of the config served now, against which each API key the storage
        # brings is checked: a secret both hold is the file key's, and the operator is told.
        # Set with each snapshot (`gateway.runtime`); None: no file to check against.
        self.secret_clashes: SecretClashes | None = None
        # The products and plans of the config served now, also set with each snapshot: the
        # API keys that name others are told after each full read and each reload. None:
        # no config yet, nothing to tell.
        self.config_names: tuple[Collection[str], Collection[str]] | None = None
        # Whether this process tells the two above: API keys naming what the config lacks, and
        # secrets a file key shares with an API key. Every worker of a gateway reads the same
        # keys from the same storage and so finds the same, and each telling it made one
        # problem look like several; the supervisor, which would say it once, reads no API
        # keys. So one worker tells them: worker 0 (`gateway.server.Worker`), whose number a
        # restart keeps, and whose first read after one tells them again for what it serves.
        self.tells_shared_warnings = True

    def tell_not_in_config(self) -> None:
        """One WARNING when API keys name a product or plan the config served now lacks (a
        reload took it out, or the gateway started without it): their requests on those
        products fail until the config has them again or the keys are changed."""
        if self.config_names is not None:
            tell_not_in_config(self.table, *self.config_names)

    async def start(self) -> None:
        """Start following; returns once the keys are loaded, or the first try has failed
        (until a later try succeeds, unknown keys are answered 503, not 401)."""
        if not self._backend.shared:
            self.table.loaded = True
            return
        self._task = asyncio.get_running_loop().create_task(self._follow())
        await self._first_attempt.wait()

    async def close(self) -> None:
        self._closing = True
        # Bounded, so that no storage trouble can hold up a worker's shutdown.
        await stop_tasks([self._task], _CLOSE_WAIT, "API keys: following the storage")
        self._task = None
        await self._backend.close()

    # --- admin writes ---------------------------------------------------------------------

    async def read(self, name: str) -> KeyRecord | None:
        """The key as stored now (not as this process last heard of it)."""
        text = await self._backend.read(name)
        return None if text is None else KeyRecord.from_json(text)

    async def create(self, record: KeyRecord) -> KeyRecord:
        """Store a new key; WriteRefused("name_taken" or "secret_taken")."""
        text = record.to_json()
        write = KeyWrite(record.name, None, text, add_digests=record.digests())
        version, begins = await self._backend.write(write)
        self.receive(Change(version, record.name, text, begins))
        return record

    async def update(
        self, name: str, change: Callable[[KeyRecord], KeyRecord]
    ) -> tuple[KeyRecord, KeyRecord]:
        """Replace the key by `change(current)`; (old, new). WriteRefused("not_found", ...).
        A `change` that returns the very record it was given writes nothing."""
        current, new = await self._rewrite(name, change)
        assert new is not None  # `change` always makes a record
        return current, new

    async def delete(
        self, name: str, check: Callable[[KeyRecord], None] | None = None
    ) -> KeyRecord:
        """Remove the key; the record it had. WriteRefused("not_found"). `check` is given the
        record the delete would remove (on each try, as `update`'s `change` is) and may raise
        to keep it: a condition on the key that no other write can slip past."""
        # A change that returns None deletes: `check` itself is one.
        current, _ = await self._rewrite(name, check or (lambda _current: None))
        return current

    async def _rewrite(
        self, name: str, change: Callable[[KeyRecord], KeyRecord | None]
    ) -> tuple[KeyRecord, KeyRecord | None]:
        """Replace the key by `change(current)`, or delete it when that is None; (old, new).

        Should another process change the key in between, the change is made again on the
        newer record rather than overwriting it. Within this process the writes of one key
        take turns: left to meet each other in the storage, 30 concurrent PATCHes of one key
        got 21 of 90 answered 409 where the memory storage, which has no such race, took all."""
        turn = self._turns.get(name)
        if turn is None:
            turn = self._turns[name] = _Turn()
        turn.holders += 1
        try:
            async with turn.lock:
                return await self._rewrite_now(name, change)
        finally:
            turn.holders -= 1
            if not turn.holders:
                del self._turns[name]

    async def _rewrite_now(
        self, name: str, change: Callable[[KeyRecord], KeyRecord | None]
    ) -> tuple[KeyRecord, KeyRecord | None]:
        for attempt in range(_WRITE_ATTEMPTS):
            current_text = await self._backend.read(name)
            if current_text is None:
                raise WriteRefused("not_found")
            current = KeyRecord.from_json(current_text)
            new = change(current)
            if new is current:
                # Nothing to change: no write, so no new version for every process to follow.
                return current, new
            new_text = None if new is None else new.to_json()
            old_digests = set(current.digests())
            new_digests = set() if new is None else set(new.digests())
            write = KeyWrite(
                name,
                current_text,
                new_text,
                add_digests=tuple(sorted(new_digests - old_digests)),
                remove_digests=tuple(sorted(old_digests - new_digests)),
            )
            try:
                version, begins = await self._backend.write(write)
            except WriteRefused as refused:
                if refused.reason != "changed":
                    raise
                if attempt + 1 < _WRITE_ATTEMPTS:
                    # Writers that met each other would meet again at once: spread them out.
                    await asyncio.sleep(random.uniform(0, _WRITE_BACKOFF * (attempt + 1)))
                continue
            self.receive(Change(version, name, new_text, begins))
            return current, new
        # Not a storage failure (a 503 would blame it): the key is that busy.
        raise WriteRefused("changed")

    # --- following ------------------------------------------------------------------------

    def receive(self, change: Change) -> None:
        """Apply `change` once every change before it has been applied."""
        if change.version <= self.known_version:
            return
        self._pending[change.version] = change
        if len(self._pending) > _MAX_PENDING:
            # One change has been missing for long: the next version check reads all keys.
            self._pending.clear()
        if not self._reading:
            self._apply_pending()
        elif change.version > self._early.get(change.name, 0):
            self._early[change.name] = change.version
            self._apply(change)  # and again, in order, on the table the read makes

    def _apply_pending(self) -> None:
        self._early.clear()
        while (change := self._pending.pop(self.known_version + 1, None)) is not None:
            if change.begins is not None and self._epoch == "" and not self.known_version:
                self._take_epoch(change.begins)
            self._apply(change)
            self.known_version = change.version

    def _take_epoch(self, begun: str) -> None:
        """Take `begun`, the epoch of the store that the change applied next begins, for the
        one read empty (version 0, no epoch yet): every store is empty before its first
        change, so an empty table is that store as of version 0. Taken for another store's,
        the first key made had every process read every key again, saying the storage was
        emptied. A table not empty (a key the read found after it asked for the version) is
        left to the version check, which then reads every key."""
        if not len(self.table):
            self._epoch = begun

    def _apply(self, change: Change) -> None:
        if change.record is None:
            self.table.remove(change.name)
            return
        try:
            record = KeyRecord.from_json(change.record)
        except ValueError as exc:
            log.error("key %r: unreadable record in the storage, ignored: %s", change.name, exc)
            return
        self.table.put(record)
        if self.secret_clashes is not None and self.tells_shared_warnings:
            self.secret_clashes.tell_record(record)
        if self.freeze_reads:
            # Keys made through the API reach every process here, one at a time: left to the
            # collector, each full collection walked all of them on the event loop, a pause
            # that grows with the keys (an audit creating 100,000 at 32 at once: 250-557 ms
            # each from about 50,000 keys on, and admin writes answered 503 meanwhile).
            self._applied_unfrozen += 1
            if self._applied_unfrozen >= _FREEZE_SLICE:
                self._applied_unfrozen = 0
                freeze_collected()

    async def _follow(self) -> None:
        delay = _RETRY_FIRST
        failing_since: float | None = None  # the first failure of those in a row
        told_at = 0.0
        # Not `while True`: a cancellation can be lost in redis-py (see gateway.tasks).
        while not self._closing:
            try:
                async with self._backend.subscribe() as subscription:
                    await self._while_listening(subscription, self.catch_up())
                    delay = _RETRY_FIRST
                    self._first_attempt.set()
                    if failing_since is not None:
                        down = time.monotonic() - failing_since
                        log.info("API keys: following the storage again, after %.1fs", down)
                        failing_since = None
                    await self._listen(subscription)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Whatever broke, the keys already loaded keep being served meanwhile. Told
                # once, and again every _TELL_EVERY while it lasts: a retry every 0.4 s made
                # ~10 warnings a second for two workers while Redis was down.
                now = time.monotonic()
                if failing_since is None or now - told_at >= _TELL_EVERY:
                    log.warning("API keys: following the storage failed (%s); retrying", exc)
                    told_at = now
                if failing_since is None:
                    failing_since = now
                self._first_attempt.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)

    async def _listen(self, subscription: Subscription) -> None:
        """Apply the announced changes and check the version; returns when an announcement
        was lost, or the subscription's server is no longer the master, for `_follow` to
        start over."""
        ahead_at_last_check: int | None = None
        next_check = time.monotonic() + CHECK_INTERVAL
        while not self._closing:
            wait = next_check - time.monotonic()
            if wait > 0:
                change = await subscription.next(wait)
                if change is not None:
                    self.receive(change)
                continue
            # Ours before asking: our own writes, and announcements, may move it on while the
            # storage answers, and a storage seen behind that newer version is not one that was
            # emptied (a soak audit: 11 needless full reads in 40 minutes of key churn).
            if subscription.moved():
                log.info("API keys: the storage's master moved; following it there")
                return  # on a new subscription, catching up on what the old one missed
            known = self.known_version
            stored, epoch = await self._backend.state()
            if ahead_at_last_check is not None and ahead_at_last_check > self.known_version:
                # Announcements that arrived but were not read (the event loop held up past
                # the recheck: a busy machine, a long collection) are not lost: taken first,
                # else each such moment cost a new subscription and a catch-up.
                await self._take_arrived(subscription, ahead_at_last_check)
            if ahead_at_last_check is not None and ahead_at_last_check > self.known_version:
                log.warning(
                    "API keys: storage at version %d, this process at %d: an announcement was "
                    "lost; following again",
                    stored,
                    self.known_version,
                )
                return  # on a new subscription, catching up
            # Another epoch: the store was emptied and begun again (FLUSHALL, a restart without
            # persistence) while we listened; its versions may have passed ours already.
            if stored < known or epoch != self._epoch:
                log.warning(
                    "API keys: storage emptied or replaced (version %d, this process at %d); "
                    "reading all keys",
                    stored,
                    self.known_version,
                )
                await self._while_listening(subscription, self.read_all())
                ahead_at_last_check = None
            else:
                ahead_at_last_check = stored if stored > self.known_version else None
            again = CHECK_INTERVAL if ahead_at_last_check is None else RECHECK_AHEAD
            next_check = time.monotonic() + again

    async def _take_arrived(self, subscription: Subscription, version: int) -> None:
        """Apply the announcements already received, up to `version`, without waiting for
        more (they come in version order: that many at most)."""
        for _ in range(version - self.known_version):
            change = await subscription.next(0)
            if change is None:
                return
            self.receive(change)

    async def _while_listening(self, subscription: Subscription, reading: Awaitable[None]) -> None:
        """Run `reading` (a read of many keys: seconds at 100,000) while still taking the
        announced changes, each honoured at once on the table being served (`receive`)."""
        task = asyncio.ensure_future(reading)
        try:
            while not task.done():
                change = await subscription.next(_LISTEN_SLICE)
                if change is not None:
                    self.receive(change)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await task

    async def catch_up(self) -> None:
        """Bring the table to the storage's version (subscribed already): by reading again the
        keys the changes since ours touched, or everything when that cannot be known."""
        if self._epoch is None:
            await self.read_all()
            return
        self._reading = True
        try:
            missed = await self._backend.missed(self.known_version)
            names = missed.names
            if missed.epoch != self._epoch or missed.version < self.known_version:
                names = None  # another store, or this one emptied: nothing known holds
            if names is not None:
                touched = list(dict.fromkeys(names))  # each key once, the last write wins
                texts = await self._backend.read_many(touched)
                for name, text in zip(touched, texts, strict=True):
                    self._apply(Change(missed.version, name, text))
                self._now_at(missed.version)
        finally:
            self._reading = False
        if names is None:
            await self.read_all()
            return
        self._apply_pending()
        if names:
            log.info(
                "API keys: caught up on %d changes (storage version %d)", len(names), missed.version
            )

    def _lost_with_the_store(self, epoch: str, fresh: ApiKeyTable) -> list[str]:
        """The keys served now that a store of another epoch (emptied and begun again: a
        Redis restarted without persistence, a FLUSHALL) does not hold. They are dropped with
        it, as every process sharing the storage drops them (one started later never knew
        them), but not in silence: nothing else tells the operator that paying customers are
        about to get 401."""
        if self._epoch is None:
            return []  # the first read
        # A store with no epoch has never been written since it began: whatever we serve, it
        # lost. One read empty (no epoch then) and begun since may be the same store, and a
        # key it lacks may have been deleted in between: no alarm then.
        if epoch and self._epoch in (epoch, ""):
            return []  # the same store (or maybe): a key it lacks was deleted
        return [name for name in self.table.records if name not in fresh.records]

    def _now_at(self, version: int) -> None:
        """The table is the storage as of `version`: the changes up to it that wait are done."""
        self.known_version = version
        self._pending = {v: c for v, c in self._pending.items() if v > version}

    async def read_all(self) -> None:
        """Replace the table by a full read of the storage (subscribed already)."""
        self._reading = True
        try:
            version, epoch = await self._backend.state()
            # Filled a slice at a time, the event loop serving requests in between, then
            # swapped in: 100,000 keys do not stall traffic while they are read.
            fresh = ApiKeyTable()
            unfrozen = 0  # records of `fresh` not frozen yet
            async for batch in self._backend.load():
                for start in range(0, len(batch), _PARSE_SLICE):
                    for name, text in batch[start : start + _PARSE_SLICE]:
                        try:
                            fresh.put(KeyRecord.from_json(text))
                        except ValueError as exc:
                            log.error("key %r: unreadable record, ignored: %s", name, exc)
                    await asyncio.sleep(0)
                unfrozen += len(batch)
                if self.freeze_reads and unfrozen >= _FREEZE_SLICE:
                    freeze_collected()
                    unfrozen = 0
            # No collector pause, as a config has: it would span awaits, and a read abandoned
            # mid-way would leave the collector off for good. Without the freezes a full
            # collection walked the table (three objects a key) on the event loop: with
            # 100,000 keys up to 202 ms during a read, and 52-158 ms after it.
            lost = self._lost_with_the_store(epoch, fresh)
            given_up = self.table.take(fresh)
            self._now_at(version)
            self._epoch = epoch
        finally:
            self._reading = False
        self._apply_pending()
        if self.freeze_reads:
            freeze_collected()  # the read's last records
        log.info("API keys: %d loaded (storage version %d)", len(self.table), version)
        if lost:
            tell_lost(lost)
        if self.tells_shared_warnings:
            if self.secret_clashes is not None:
                self.secret_clashes.tell_all()
            self.tell_not_in_config()
        # The old table let go of a slice at a time: freeing 100,000 records at once held the
        # event loop 35 ms.
        for container in given_up:
            while container:
                for _ in range(min(len(container), _FREE_SLICE)):
                    container.popitem()
                await asyncio.sleep(0)
