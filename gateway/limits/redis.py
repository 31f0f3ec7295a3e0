"""The shared limit storage: Redis, Redis Cluster or a Sentinel-watched Redis, for several
gateway processes.

One request costs one EVALSHA of `hit.lua`, which checks and consumes the rate and the quota
and counts the day's history atomically on the server; a refunded one, or one settled at a
cost its upstream reported, costs one more, of `settle.lua`. The script runs on Redis's
clock, so gateways with skewed clocks agree on the sliding window; the quota period is
computed here because it needs the plan's timezone, and the UTC day here too, so that every
key a script touches is named in its KEYS.
Every key of a subscription carries the subject as hash tag, so they live in one cluster slot.

A key's history and the billing export find the subscriptions with history in sets
(`gateway.limits.redis_registry`), which the script writes as it begins a day's history; on a
cluster they live in slots of their own, and the registry writes them before the hit of a
subscription's first admission of each day in this process.

On a single Redis, the calls made in the same event-loop tick are sent together as one
pipeline, on a connection of their own (`gateway.limits.resp`, which says why); the other
calls (usage, reset, ping) use redis-py. On a cluster each call is its own EVALSHA through
redis-py, sent concurrently (redis-py refuses EVALSHA in a cluster pipeline). Every call is
bounded by `storage.timeout`, and every failure leaves as `StorageError`; both connections
reconnect by themselves on a later call once Redis is back. A Redis that answers nothing costs
the hits and refunds that meet it the timeout only until it is found silent; from then on they
fail at once (a single Redis: `gateway.limits.resp`; each node of a cluster apart:
`gateway.limits.cluster_calls`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Callable
from functools import partial
from typing import Any, cast
from zoneinfo import ZoneInfo

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from gateway.config.model import QuotaRule, RateRule, StorageConfig
from gateway.limits.base import (
    CREDIT_KEY_TTL,
    DAY_SECONDS,
    HISTORY_DAYS,
    Abandoned,
    Credited,
    DayUsage,
    Decision,
    QuotaUsage,
    Receipt,
    StorageError,
    day_of,
)
from gateway.limits.cluster_calls import ClusterCalls
from gateway.limits.periods import PeriodCache
from gateway.limits.redis_clients import (
    MASTER_RECHECK_SECONDS,
    StorageGuard,
    StorageRedis,
    open_storage_redis,
)
from gateway.limits.redis_layout import (
    CREDIT,
    HIT,
    PACKED_COSTS,
    RESET,
    SETTLE,
    AnyRedis,
    credit_once_key,
    day_key,
    pack_evalsha,
    packed_cost,
    quota_key,
    rate_key,
    run_script,
)
from gateway.limits.redis_registry import SubscriptionRegistry, in_subject_order, index_of
from gateway.limits.redis_replies import decision_from_reply
from gateway.limits.resp import ScriptPipeline

# Subscriptions read per pipeline by the export, for one day.
_READ_BATCH = 500

_TOO_LATE = 3  # hit.lua's outcome for a hit that ran after its deadline (ScriptPipeline.deadline)
_DAY_INDEXED = 2  # hit.lua began the day's history and wrote the registry's sets itself
# A check's arguments as `decision_from_reply` takes them: rate, quota, cost, plan, period start
# and end, the time it was made, its UTC day, and whether it settles.
_HitRequest = tuple[RateRule | None, QuotaRule | None, int, str, float, float, float, int, bool]
_SETTLED_TOO_LATE = -1  # settle.lua's answer when it ran after its deadline
# A quota counter outlives its period a little so that a gateway whose clock lags still
# counts into the same key instead of starting a fresh one.
_QUOTA_GRACE_SECONDS = 60.0
# Subjects whose EVALSHA is kept ready, at most (about 1.7 KB each); they are also dropped
# when a day ends (RedisLimiter._remember_command).
_MAX_COMMANDS = 10_000

log = logging.getLogger(__name__)


def _quota_expire_ms(start: float, end: float) -> int:
    """When a quota counter of the period [start, end) may vanish, in unix milliseconds."""
    return round((end + min(_QUOTA_GRACE_SECONDS, end - start)) * 1000)


class _Command:
    """One subject's EVALSHA of `hit.lua`: the same keys and arguments on every hit of a
    subject within one quota period and UTC day but the cost, so it is built (and packed)
    once per period and day; the cost, packed, is appended per hit."""

    __slots__ = ("args", "keys", "packed", "shape")

    def __init__(
        self,
        shape: _Shape,
        keys: tuple[str, ...],
        args: tuple[int | str, ...],
        packed: bytes,
    ) -> None:
        self.shape = shape
        self.keys = keys
        self.args = args
        self.packed = packed  # without the cost, which is the last argument


# (rate limit, rate window, quota limit, period start, period end, day, plan, quota's kind of
# period and time zone): what a command follows from. Plain values, not the rule itself: a
# reload makes equal rules anew, and comparing those field by field on every hit cost more.
_Shape = tuple[int, float, int, float, float, int, str, str, ZoneInfo | None]


class RedisLimiter:
    """A `Limiter` shared by every gateway process that uses the same Redis."""

    def __init__(
        self,
        storage: StorageRedis,
        timeout: float,
        on_storage_error: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._storage = storage.share()
        client: AnyRedis = storage.client
        self._client = client
        # Every call but the single Redis's hits, refunds and charges (on their pipeline) runs under
        # it; those raise its `error` too.
        self._guard = StorageGuard(client, timeout, "limit storage", on_storage_error)
        self._timeout = timeout
        self._clock = clock
        self._periods = PeriodCache()
        self._commands: dict[str, _Command] = {}
        self._commands_day = 0  # the day the commands in _commands were made for
        # On a single Redis the hits of one tick go out together on a connection of their
        # own, each batch under the storage timeout already; on a cluster each hit is its
        # own redis-py call under _guard.
        self._pipeline: ScriptPipeline | None = None
        if isinstance(client, Redis):
            self._pipeline = ScriptPipeline(
                client,
                (HIT.text, SETTLE.text),
                timeout,
                storage.address,
                recheck_address_every=MASTER_RECHECK_SECONDS if storage.master_moves else None,
            )
            encoder = client.get_encoder()  # type: ignore[no-untyped-call]
            self._pack_evalsha = partial(
                pack_evalsha, encoding=encoder.encoding, errors=encoder.encoding_errors
            )
        self._cluster_calls: ClusterCalls | None = None
        if isinstance(client, RedisCluster):
            self._cluster_calls = ClusterCalls(client, self._guard, timeout)
        self._registry = SubscriptionRegistry(
            client, self._guard, self._pipeline, clock, self._cluster_calls
        )

    @classmethod
    def from_config(
        cls,
        storage: StorageConfig,
        on_storage_error: Callable[[str], None] | None = None,
        redis: StorageRedis | None = None,
    ) -> RedisLimiter:
        """`redis`: the worker's clients of `storage.url`, shared with its key store."""
        return cls(
            redis or open_storage_redis(storage.url, storage.timeout),
            storage.timeout,
            on_storage_error,
        )

    async def hit(
        self,
        subject: str,
        rate: RateRule | None,
        quota: QuotaRule | None,
        cost: int = 1,
        plan: str = "",
        abandoned: Abandoned | None = None,
        settles: bool = False,
    ) -> Decision:
        now = self._clock()
        day = day_of(now)
        if quota is not None:
            start, end = self._periods.period(now, quota.per, quota.timezone)
        else:
            start = end = 0.0
        shape = (
            rate.limit if rate is not None else -1,
            rate.window if rate is not None else 0.0,
            quota.limit if quota is not None else -1,
            start,
            end,
            day,
            plan,
            quota.per if quota is not None else "",
            quota.timezone if quota is not None else None,
        )
        command = self._commands.get(subject)
        if command is None or command.shape != shape:
            command = self._remember_command(subject, shape, quota)

        pipeline = self._pipeline
        indexed = False  # the registry's sets written before the hit
        if pipeline is not None:
            packed = PACKED_COSTS.get(cost) or packed_cost(cost)
            future = pipeline.run(b"".join((command.packed, packed, pipeline.deadline())))
            try:
                reply = await future
            except asyncio.CancelledError:
                # Its client left while the check was on its way: what Redis decides goes to
                # `abandoned` (the arguments gathered only now, off the common path).
                if abandoned is not None:
                    request = (rate, quota, cost, plan, start, end, now, day, settles)
                    late = partial(self._late, abandoned, subject, request)
                    pipeline.when_answered(future, late)
                raise
            except Exception as exc:
                self._unanswered(subject, day)
                raise self._guard.error("hit", exc) from exc
            pipeline.learn_redis_time(reply[8])
        else:
            # One EVALSHA per call: redis-py refuses EVALSHA in a cluster pipeline, and the
            # calls of one tick mostly go to different nodes anyway. Refused at once (never
            # sent, so nothing to forget) while the subject's node answers nothing.
            calls = self._cluster_calls
            assert calls is not None
            check = calls.script("hit", HIT, command.keys, (*command.args, cost))
            within = None  # the storage timeout
            if self._registry.index_due(subject, day):
                # The script cannot write the registry's sets here: they go first, so that the
                # hit that begins the day finds them written (a worker killed after its reply
                # cannot leave the day out of the export). Both share one storage timeout (the
                # hit's deadline counts from the making of `check`, above).
                indexed, within = await self._registry.index_first(subject, day, self._timeout)
            # A task, so that a caller cancelled meanwhile leaves it to finish for `abandoned`
            # (redis-py drops a connection whose command is cancelled, reply and all).
            checking = asyncio.ensure_future(self._guard("hit", check, within=within))
            try:
                reply = await asyncio.shield(checking)
            except asyncio.CancelledError:
                request = (rate, quota, cost, plan, start, end, now, day, settles)
                checking.add_done_callback(partial(self._late_task, abandoned, subject, request))
                raise
            except StorageError as failed:
                self._unanswered(subject, day)
                calls.failed(command.keys[0], failed)
                raise
            calls.learn(command.keys[0], reply[8])
        self._taken(reply, subject, day, indexed)
        return decision_from_reply(reply, rate, quota, cost, plan, start, end, now, day, settles)

    def _late(self, abandoned: Abandoned, subject: str, request: _HitRequest, reply: Any) -> None:
        """The reply of a check whose caller was cancelled: what Redis decided, for
        `abandoned` (nothing when it ran after its deadline and took nothing)."""
        if reply[0] == _TOO_LATE:
            return
        try:
            self._taken(reply, subject, request[7])
            abandoned(decision_from_reply(reply, *request))
        except Exception:
            log.exception("could not settle a limit check whose request had gone")

    def _late_task(
        self,
        abandoned: Abandoned | None,
        subject: str,
        request: _HitRequest,
        checking: asyncio.Future[Any],
    ) -> None:
        # The exception is taken in any case: a task's error nobody asked for is logged.
        if checking.cancelled() or checking.exception() is not None or abandoned is None:
            return
        self._late(abandoned, subject, request, checking.result())

    def _taken(self, reply: Any, subject: str, day: int, indexed: bool = False) -> None:
        """What a check's reply asks of this process before its decision is read: nothing
        taken after its deadline is an error; a first admission is registered (`indexed`:
        the registry wrote its sets before the check)."""
        code = reply[0]
        if code == _TOO_LATE:
            # Redis ran it after its deadline (limits/redis_clock.py): nothing was taken.
            late = StorageError("it ran after its deadline on Redis's clock; nothing was taken")
            raise self._guard.error("hit", late)
        # 7: a new day began (_DAY_INDEXED: its sets written already). Tested here, not in the
        # registry: every admission passes by.
        if code == 0 and (reply[7] or subject not in self._registry.recorded):
            self._registry.record(subject, day, indexed=indexed or reply[7] == _DAY_INDEXED)

    def _remember_command(self, subject: str, shape: _Shape, quota: QuotaRule | None) -> _Command:
        day = shape[5]
        if day != self._commands_day or len(self._commands) >= _MAX_COMMANDS:
            # A command names its day's key, so none made before today is used again: this
            # drops a deleted key's (or one no longer called) at the latest when its day ends.
            self._commands.clear()
            self._commands_day = day
        command = self._commands[subject] = self._command(subject, shape, quota)
        return command

    def _command(self, subject: str, shape: _Shape, quota: QuotaRule | None) -> _Command:
        rate_limit, rate_window, quota_limit, start, end, day, plan, _, _ = shape
        window_us = round(rate_window * 1_000_000)  # 0 without a rate
        quota_expire_ms = _quota_expire_ms(start, end)
        day_expire_ms = (day + 1 + HISTORY_DAYS) * DAY_SECONDS * 1000
        # Without a quota the script never reads its key: any name does.
        quota_name = quota_key(subject, start, quota) if quota is not None else rate_key(subject)
        keys = (rate_key(subject), quota_name, day_key(subject, day))
        args = (rate_limit, window_us, quota_limit, quota_expire_ms, day_expire_ms, plan)
        if self._pipeline is None:
            # On a cluster the registry's sets live in other slots: the script leaves them to
            # the registry (its subject and product go empty). redis-py packs each call itself.
            return _Command(shape, keys, (*args, "", ""), b"")
        # The registry's sets, for the script to write as it begins the day: a few dozen bytes
        # more per hit, their commands only on the day's first admission. Packed once per
        # subject, quota period and day (the plain packer is fast enough); the cost and the
        # deadline are appended per hit.
        sets, members = index_of(subject, day)
        packed = self._pack_evalsha(HIT, (*keys, *sets), (*args, *members), to_come=2)
        return _Command(shape, (*keys, *sets), (*args, *members), packed)

    def _unanswered(self, subject: str, day: int) -> None:
        """A hit whose reply never came may still have run and begun a day's history."""
        self._registry.forget(subject, day)

    async def refund(self, subject: str, receipt: Receipt) -> int:
        return await self._settle("refund", subject, receipt, -receipt.cost)

    async def charge(self, subject: str, receipt: Receipt, units: int) -> int:
        return await self._settle("charge", subject, receipt, units)

    async def _settle(self, operation: str, subject: str, receipt: Receipt, change: int) -> int:
        """Run `settle.lua` for the counters `receipt` names: `change` below 0 gives back,
        above 0 takes more."""
        quota = receipt.quota
        keys = (
            # Without a quota the script never reads its key: any name of the slot does.
            quota_key(subject, receipt.period_start, quota) if quota else rate_key(subject),
            day_key(subject, receipt.day),
        )
        args = (change, receipt.quota_stamp, receipt.day_stamp, receipt.plan)
        pipeline = self._pipeline
        if pipeline is None:
            calls = self._cluster_calls
            assert calls is not None
            settling = calls.script(operation, SETTLE, keys, args)  # refused as a hit is
            try:
                moved = int(await self._guard(operation, settling))
            except StorageError as failed:
                calls.failed(keys[0], failed)
                raise
        else:
            # On the hits' connection: it notices a restarted Redis as soon as the loop does,
            # where a pooled redis-py connection would send into the dead one first.
            packed = self._pack_evalsha(SETTLE, keys, args, to_come=1) + pipeline.deadline()
            try:
                moved = int(await pipeline.run(packed))
            except Exception as exc:
                raise self._guard.error(operation, exc) from exc
        if moved == _SETTLED_TOO_LATE:
            # A stalled Redis ran it after the gateway gave up on it: nothing was moved, as
            # the count of errors then says.
            late = StorageError("it ran after its deadline on Redis's clock; nothing was moved")
            raise self._guard.error(operation, late)
        return moved

    async def credit(
        self, subject: str, quota: QuotaRule, amount: int, once: str | None = None
    ) -> Credited:
        start, end = self._periods.period(self._clock(), quota.per, quota.timezone)
        expire_ms = _quota_expire_ms(start, end)
        keys: tuple[str, ...] = (quota_key(subject, start, quota),)
        args: tuple[int, ...] = (amount, expire_ms)
        if once is not None:
            keys += (credit_once_key(subject, once),)
            args += (int(CREDIT_KEY_TTL * 1000),)
        used, credit, earlier = await self._guard(
            "credit", lambda: run_script(self._client, CREDIT, keys, args)
        )
        usage = _usage(quota, int(used), int(credit), end)
        if int(earlier) >= 0:
            return Credited(usage, int(earlier), replayed=True)
        return Credited(usage, amount)

    async def usage(self, subject: str, quota: QuotaRule) -> QuotaUsage:
        start, end = self._periods.period(self._clock(), quota.per, quota.timezone)
        key = quota_key(subject, start, quota)
        used, credit = await self._guard(
            "usage", lambda: self._client.hmget(key, ["used", "credit"]), repeatable=True
        )
        return _usage(quota, int(used or 0), int(credit or 0), end)

    async def reset_quota(self, subject: str, quota: QuotaRule) -> None:
        start, _ = self._periods.period(self._clock(), quota.per, quota.timezone)
        # A new `born` as well: refunds of requests admitted before the reset then leave the
        # counter alone instead of taking from requests admitted since (reset.lua).
        keys = (quota_key(subject, start, quota),)
        await self._guard(
            "reset", lambda: run_script(self._client, RESET, keys, ()), repeatable=True
        )

    async def history(self, key_name: str, first_day: int, last_day: int) -> list[DayUsage]:
        subjects = await self._registry.of_key(key_name, first_day)
        days = [(day, subject) for day in range(first_day, last_day + 1) for subject in subjects]
        # Every day of the range in one pipeline (a few hundred small reads): one round
        # trip, where a call per day made up to HISTORY_DAYS of them.
        return await self._read_days(days)

    async def export(self, first_day: int, last_day: int) -> AsyncGenerator[list[DayUsage], None]:
        read_day = await self._registry.of_days()
        for day in range(first_day, last_day + 1):
            subjects = await in_subject_order(read_day(day))
            while batch := list(itertools.islice(subjects, _READ_BATCH)):
                lines = await self._read_days([(day, subject) for subject in batch])
                if lines:
                    yield lines

    async def _read_days(self, days: list[tuple[int, str]]) -> list[DayUsage]:
        """The history of each (day, subject) of `days`, in their order, by plan within each.

        One pipeline: on a cluster redis-py sends each node its part (a subject's days share
        its slot) and the nodes answer concurrently."""
        if not days:
            return []

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for day, subject in days:
                pipe.hgetall(day_key(subject, day))
            return await pipe.execute()

        lines: list[DayUsage] = []
        for (day, subject), fields in zip(
            days, await self._guard("history", read, repeatable=True), strict=True
        ):
            counts: dict[str, list[int]] = {}
            for raw_name, raw_value in fields.items():
                name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
                kind, _, plan = name.partition(":")
                if kind in ("r", "u"):
                    counts.setdefault(plan, [0, 0])[kind == "u"] = int(raw_value)
            for plan, (requests, units) in sorted(counts.items()):
                if requests:
                    lines.append(DayUsage(day, subject, plan, requests, units))
        return lines

    async def ping(self) -> None:
        if self._cluster_calls is None:
            await self._guard("ping", self._client.ping, repeatable=True)
        else:
            await self._guard("ping", self._cluster_serves, repeatable=True)

    async def _cluster_serves(self) -> None:
        """A Redis Cluster that has lost a master (with `cluster-require-full-coverage yes`,
        Redis's default) still answers PING on every node, and CLUSTERDOWN to every command
        with a key: /readyz said 200 while 114 of 136 requests a second were 503."""
        info = await cast(RedisCluster, self._client).cluster_info()
        state = info.get("cluster_state") if isinstance(info, dict) else None
        if state != "ok":
            raise RedisError(f"the cluster's state is {state}")

    async def close(self) -> None:
        await self._registry.close()
        if self._pipeline is not None:
            await self._pipeline.close()
        if self._cluster_calls is not None:
            await self._cluster_calls.close()
        await self._guard.settle()
        await self._storage.aclose()


def _usage(quota: QuotaRule, used: int, credit: int, reset_at: float) -> QuotaUsage:
    limit = quota.limit + credit
    return QuotaUsage(
        limit=limit, used=used, remaining=max(0, limit - used), reset_at=reset_at, credit=credit
    )
