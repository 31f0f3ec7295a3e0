"""Which subscriptions ("<key name>:<product>") have history in the Redis storage: what a key's
usage history and the billing export read before the day hashes themselves.

Three sets. On a single Redis (or Sentinel's) the hit script (`hit.lua`) adds a subscription
to the first two itself when it begins the subscription's day history, atomically with its
counts: written after the reply, a worker killed (or a Redis failing) in between left the
subscription out of that day's export for good, though the day's hash counted its requests.
On a Redis Cluster they live in slots other than the subscription's, so the script cannot
write them: a process writes them before it sends the hit of a subscription's first admission
of each UTC day, and waits for that (`SubscriptionRegistry.index_first`), so that the hit that
begins the day finds them written. The day is the gateway's (the limiter names the day's hash
by its own clock), so the sets written are those of the day the hit counts in. When that write
fails the hit goes on as ever, and the write after its reply (tried again until it is in)
stands in, as it did for every day before. The third is written in the background on either
(`SubscriptionRegistry.record` says why):

    gw:subs:key:<key name>      the products of that key with history: a key's history
    gw:subs:day:<YYYY-MM-DD>    the subscriptions with history that day: the export's day
    gw:subscriptions            every subscription: the one set of gateways before the two
                                above, read only for days before `gw:subs:since`, and written
                                only while gateways of that layout may still run beside
                                this one (below)

The first two expire with the last history they name (400 days after its day), so a key's
history and a day of the export read only what they answer, however many subscriptions the
storage has seen. With the one set alone, a key's history read every subscription ever (at
250,000 of them that took longer than `storage.timeout`: a 503), and the export read every
subscription for every day of its range.

`gw:subs:since` is the first day the two sets are complete: 0 for a storage that never had the
old set, else the day after a gateway that writes them first came. Until then gateways of the
old layout (a rolling upgrade) may have recorded subscriptions in the old set alone. They read
only the old set, so this process writes it too, but only up to `gw:subs:since` (the upgrade's
day and the next, for an upgrade across midnight UTC): the old set has no expiry, and written
for good it grew by every subscription at every key's churn, for nobody. A storage that never
had the old set never gets it (going back to a gateway of the old layout then finds no history
recorded by this one).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any

from gateway.limits.base import DAY_SECONDS, HISTORY_DAYS, StorageError, day_of, day_text
from gateway.limits.cluster_calls import ClusterCalls
from gateway.limits.redis_clients import StorageGuard
from gateway.limits.redis_layout import AnyRedis
from gateway.limits.resp import ScriptPipeline, pack
from gateway.tasks import STEP_TIMEOUT, stop_tasks

LEGACY_KEY = "gw:subscriptions"
SINCE_KEY = "gw:subs:since"
# Subjects remembered as recorded by this process; beyond it the memory starts afresh (and
# each subject is recorded once more on its next admission).
_MAX_REMEMBERED = 10_000
# Subjects remembered (on a cluster) as having their day's sets written; beyond it the memory
# starts afresh, and each costs its write before the hit once more. Larger than the above:
# forgetting costs a round trip on an admission's way, not a write in the background.
_MAX_INDEXED = 100_000
# The share of the storage timeout a subscription's first admission of the day waits for its
# sets (on a cluster) before its hit is sent without them: the hit keeps the rest.
_INDEX_WAIT_SHARE = 0.5
# A recording that failed is tried again after these many seconds, then every last one: until
# it is in, the day's export does not know the subscription had history.
_RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 15.0, 60.0)
# Members of a day's set read per call by the export (SSCAN's COUNT, a hint to Redis).
_PAGE = 1000

log = logging.getLogger(__name__)


def key_set(key_name: str) -> str:
    return f"gw:subs:key:{key_name}"


def day_set(day: int) -> str:
    return f"gw:subs:day:{day_text(day)}"


def index_of(subject: str, day: int) -> tuple[tuple[str, str], tuple[str, str]]:
    """The day's set and the key's set that name `subject` with history on `day`, and the
    members that name it there (the subject, its product), for the hit script."""
    key_name, _, product = subject.partition(":")
    return (day_set(day), key_set(key_name)), (subject, product)


def _decoded(members: Any) -> list[str]:
    return [m.decode() if isinstance(m, bytes) else str(m) for m in members]


class SubscriptionRegistry:
    """Records subscriptions with history and finds them again (see the module docstring)."""

    def __init__(
        self,
        client: AnyRedis,
        guard: StorageGuard,
        pipeline: ScriptPipeline | None,
        clock: Callable[[], float],
        cluster_calls: ClusterCalls | None = None,
    ) -> None:
        self._client = client
        self._guard = guard
        self._pipeline = pipeline  # a single Redis's hits connection, which records too
        self._clock = clock
        self._cluster_calls = cluster_calls  # on a cluster: which nodes answer nothing
        self._since: int | None = None
        self.recorded: set[str] = set()  # subjects recorded, or on their way
        self._recording: set[asyncio.Task[object]] = set()  # calls under way
        # Recordings of (subject, day) that failed, each tried again by a task of its own
        # (apart: a history or export waits for the calls under way, never for these).
        self._retries: dict[tuple[str, int], asyncio.Task[None]] = {}
        # On a cluster: the subjects whose sets this process has written for `_indexed_day`
        # (before a hit or after one), and the writes before a hit under way, one per subject
        # and day, which the admissions that come meanwhile wait for too.
        self._indexed_day = 0
        self._indexed: set[str] = set()
        self._indexing: dict[tuple[str, int], asyncio.Task[bool]] = {}

    def index_due(self, subject: str, day: int) -> bool:
        """Whether, on a cluster, the hit of `subject` on `day` is to wait for `index_first`:
        this process has not written its sets for that day yet."""
        return day != self._indexed_day or subject not in self._indexed

    async def index_first(self, subject: str, day: int, budget: float) -> tuple[bool, float]:
        """Write the day's set and the key's set that name `subject` with history on `day`,
        before its hit (on a cluster, where the script cannot), waiting a share of `budget`
        (the storage timeout) at most: whether they are written, and what is left of `budget`
        for the hit (so that a storage that fails is answered within the one timeout, as ever).

        The hit that begins a subscription's day in a process comes after this, so a worker
        killed after its reply leaves the sets written. Its cost: one round trip (the two sets
        at once, on their nodes) on a subscription's first admission of each day in each
        process; none on the later ones (`index_due`). A hit then refused leaves a
        subscription named with no history that day, which the export and a key's history
        pass over. Never an error: when the storage fails here, or has not answered within
        the share (or a set's node is found silent, when nothing is sent to it), the hit goes
        on as it did before this write was made, and the limiter records the day after its
        reply if it began it (`record`, then again until that is in)."""
        due = (subject, day)
        writing = self._indexing.get(due)
        if writing is None:
            calls = self._cluster_calls
            if calls is not None and any(calls.silent(name) for name in index_of(subject, day)[0]):
                return False, budget
            writing = asyncio.get_running_loop().create_task(self._write_index(subject, day))
            self._indexing[due] = writing
            writing.add_done_callback(lambda _: self._indexing.pop(due, None))
        if writing.done():
            return writing.result(), budget
        loop = asyncio.get_running_loop()
        began = loop.time()
        # Neither a caller cancelled meanwhile (its client left: no hit is sent) nor one that
        # stops waiting ends the write: the other admissions that wait need it.
        await asyncio.wait((writing,), timeout=budget * _INDEX_WAIT_SHARE)
        left = budget - (loop.time() - began)
        return (writing.done() and writing.result()), left

    async def _write_index(self, subject: str, day: int) -> bool:
        try:
            await self._write(self._index_commands(subject, day))
        except StorageError as failed:
            log.debug("could not write the sets of %s before its hit: %s", subject, failed)
            if self._cluster_calls is not None:
                for name in index_of(subject, day)[0]:
                    self._cluster_calls.failed(name, failed)  # a silent node is checked
            return False
        self._remember_indexed(subject, day)
        return True

    def _remember_indexed(self, subject: str, day: int) -> None:
        if self._cluster_calls is None:
            return  # the hit script writes the sets itself: nothing to remember
        if day > self._indexed_day:
            self._indexed.clear()  # a new day: every subscription's sets are due again
            self._indexed_day = day
        if day == self._indexed_day:
            if len(self._indexed) >= _MAX_INDEXED:
                self._indexed.clear()
            self._indexed.add(subject)

    def record(self, subject: str, day: int, indexed: bool = False) -> None:
        """Record `subject` as having history on `day`, in the background: the admission that
        asks for it waits for nothing more. The limiter asks once per process (`recorded`
        holds those asked for) and again on the first admission of each day (Redis may have
        lost the sets). `indexed`: the day's and the key's set are written already (by the hit
        script, or by `index_first` before the hit).

        The old set is left to this background write even then: for the script to write it,
        every hit would carry two more keys (the old set and `gw:subs:since`) and the script
        would repeat `since` (or a process could not admit before it knew `since`), for a set
        written on an upgrade's two days alone. A worker that dies before this write leaves
        the subscription out of the old set, which older gateways read on those days (and this
        one for the days before `since`, the upgrade's day)."""
        if len(self.recorded) >= _MAX_REMEMBERED:
            self.recorded.clear()
        self.recorded.add(subject)
        if indexed and self._since is not None and day > self._since:
            return  # nothing left to write, and no task for it
        task = asyncio.get_running_loop().create_task(self._record(subject, day, indexed))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)

    def forget(self, subject: str, day: int) -> None:
        """A check whose reply never came may still have run (a stalled Redis runs it when it
        wakes) and begun a day, and its reply was what said so: `subject` is recorded for
        `day` now, until that is in (a subscription with no history that day costs the export
        nothing), and again on its next admission."""
        self.recorded.discard(subject)
        self._record_until_in(subject, day)

    def _record_until_in(self, subject: str, day: int) -> None:
        recording = (subject, day)
        if recording in self._retries:
            return  # tried again already
        task = asyncio.get_running_loop().create_task(self._retry(subject, day))
        self._retries[recording] = task
        task.add_done_callback(lambda _: self._retries.pop(recording, None))

    async def _retry(self, subject: str, day: int) -> None:
        """Records `subject` for `day` until that is in. Recording is idempotent (set adds and
        expiries), so unlike a refund it is safe to try again: the day's only admission of a
        subscription whose recording failed (a Redis stalled or restarting just then) was in
        the history but never in the export, unless another admission in this process came
        after it that day."""
        for attempt in itertools.count():
            await asyncio.sleep(_RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)])
            if await self._record(subject, day, retried=True):
                return

    async def _record(
        self, subject: str, day: int, indexed: bool = False, retried: bool = False
    ) -> bool:
        commands = () if indexed else self._index_commands(subject, day)
        try:
            # Fixed before this process first writes the old set (see the module docstring).
            if day <= await self.since("register"):
                commands = (("SADD", LEGACY_KEY, subject), *commands)
            if not commands:
                return True
            await self._write(commands)
        except StorageError as exc:
            self.recorded.discard(subject)  # and on its next admission
            if not retried:
                # Once: while the storage is away every subject tries again, on its own.
                log.warning("could not record %s for the usage history: %s", subject, exc)
                self._record_until_in(subject, day)
            return False
        if not indexed:
            self._remember_indexed(subject, day)  # no need to write them before its next hit
        return True

    def _index_commands(self, subject: str, day: int) -> tuple[tuple[str, ...], ...]:
        """The commands that name `subject` with history on `day` in the day's and the key's
        set."""
        key_name, _, product = subject.partition(":")
        # The history of `day` is kept until this; the sets that name it, as long (the hit
        # script gives them the same expiry). The key's set names its later days too: a
        # retried recording of an earlier day must not shorten it, so it is kept as long as
        # today's history (a day more at most).
        until = str((day + 1 + HISTORY_DAYS) * DAY_SECONDS)
        key_until = str((max(day, day_of(self._clock())) + 1 + HISTORY_DAYS) * DAY_SECONDS)
        return (
            ("SADD", day_set(day), subject),
            ("EXPIREAT", day_set(day), until),
            ("SADD", key_set(key_name), product),
            ("EXPIREAT", key_set(key_name), key_until),
        )

    async def _write(self, commands: tuple[tuple[str, ...], ...]) -> None:
        """Run `commands` (idempotent writes), pipelined; raises StorageError."""
        pipeline = self._pipeline
        if pipeline is not None:
            calls = [pipeline.run(pack(*(part.encode() for part in c))) for c in commands]
            try:
                await asyncio.gather(*calls)
            except Exception as exc:
                raise self._guard.error("register", exc) from exc
            return

        async def write() -> None:
            # On a cluster redis-py sends each node its part, all at once: one round trip.
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()

        await self._guard("register", write, repeatable=True)

    async def settled(self) -> None:
        """Until this process's recordings under way are done: they are part of the answer."""
        if self._recording:
            await asyncio.gather(*list(self._recording), return_exceptions=True)

    async def since(self, operation: str = "history") -> int:
        """The first day the per-key and per-day sets are complete (see the module docstring);
        `operation` names a failure in gateway_storage_errors_total."""
        if self._since is None:
            client, guard = self._client, self._guard
            since = await guard(operation, lambda: client.get(SINCE_KEY), repeatable=True)
            if since is None:
                had_old_set = await guard(
                    operation, lambda: client.exists(LEGACY_KEY), repeatable=True
                )
                first = day_of(self._clock()) + 1 if had_old_set else 0
                await guard(
                    operation, lambda: client.set(SINCE_KEY, first, nx=True), repeatable=True
                )
                since = await guard(operation, lambda: client.get(SINCE_KEY), repeatable=True)
            self._since = int(since or 0)
        return self._since

    async def of_key(self, key_name: str, first_day: int) -> list[str]:
        """The subscriptions of `key_name` with history from `first_day` on (and maybe some
        whose history is older), sorted."""
        await self.settled()
        products = await self._members(key_set(key_name))
        subjects = {f"{key_name}:{product}" for product in products}
        if first_day < await self.since():
            prefix = key_name + ":"
            subjects.update(s for s in await self._members(LEGACY_KEY) if s.startswith(prefix))
        return sorted(subjects)

    async def of_days(self) -> Callable[[int], AsyncIterator[list[str]]]:
        """A reader of each day's subscriptions with history, for the export: `read(day)`
        gives them a page at a time, each unsorted (a subscription may come in two pages), so
        that a day of 100,000 subscriptions is neither read nor decoded in one go (that held
        the event loop for half a second). The old set is read at most once."""
        await self.settled()
        since = await self.since()
        old_set: list[str] | None = None

        async def read(day: int) -> AsyncIterator[list[str]]:
            nonlocal old_set
            if day >= since:
                async for page in self._pages(day_set(day)):
                    yield page
                return
            if old_set is None:
                old_set = await self._members(LEGACY_KEY)
            for begin in range(0, len(old_set), _PAGE):
                yield old_set[begin : begin + _PAGE]
                await asyncio.sleep(0)  # the export sorts each page: traffic goes on between

        return read

    async def _pages(self, name: str) -> AsyncIterator[list[str]]:
        """The members of the set `name`, a page of about `_PAGE` at a time (SSCAN: one may
        come again in a later page)."""
        client = self._client
        cursor = 0
        while True:
            scan = partial(client.sscan, name, cursor, count=_PAGE)
            cursor, members = await self._guard("history", scan, repeatable=True)
            yield _decoded(members)
            if int(cursor) == 0:
                return

    async def _members(self, name: str) -> list[str]:
        client = self._client
        members = await self._guard("history", lambda: client.smembers(name), repeatable=True)
        return _decoded(members)

    async def close(self) -> None:
        # Recording is best effort: a process that stops need not wait for it.
        await stop_tasks(
            [*self._recording, *self._retries.values(), *self._indexing.values()],
            STEP_TIMEOUT,
            "recording a subscription",
        )


async def in_subject_order(pages: AsyncIterator[list[str]]) -> Iterator[str]:
    """The subscriptions of a day's pages (`SubscriptionRegistry.of_days`), each once, by key
    name, then product (`base.subject_order`), as the billing export lists them.

    Each page is sorted apart as it comes, and the pages merged as the lines are read: one
    sort of a day's 120,000 subscriptions (and its SMEMBERS) held the event loop for 0.5-1 s,
    the proxy's traffic with it."""
    seen: set[str] = set()
    runs: list[list[str]] = []
    async for page in pages:
        run = sorted({_in_order(subject) for subject in page}.difference(seen))
        seen.update(run)
        runs.append(run)
    return (_subject(in_order) for in_order in heapq.merge(*runs))


def _in_order(subject: str) -> str:
    """`subject` ("<key name>:<product>") as a string that a plain sort puts in the order of
    `base.subject_order` (key name, then product): a name has no character below NUL."""
    return subject.replace(":", "\x00", 1)


def _subject(in_order: str) -> str:
    return in_order.replace("\x00", ":", 1)
