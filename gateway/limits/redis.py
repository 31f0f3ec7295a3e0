"""The shared limit storage: Redis or Redis Cluster, for several gateway processes.

One request costs one EVALSHA of `hit.lua`, which checks and consumes the rate and the quota
atomically on the server. The script runs on Redis's clock, so gateways with skewed clocks
agree on the sliding window; the quota period is computed here because it needs the plan's
timezone. Both keys of a subscription carry the subject as hash tag, so they live in one
cluster slot.

On a single Redis, the calls made in the same event-loop tick are sent together as one
pipeline, on a connection of their own (`gateway.limits.resp`, which says why); the other
calls (usage, reset, ping) use redis-py. On a cluster each call is its own EVALSHA through
redis-py, sent concurrently (redis-py refuses EVALSHA in a cluster pipeline). Every call is
bounded by `storage.timeout`, and every failure leaves as `StorageError`; both connections
reconnect by themselves on a later call once Redis is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config.model import QuotaRule, RateRule, StorageConfig
from gateway.limits.base import (
    Decision,
    Outcome,
    QuotaUsage,
    StorageError,
    WindowState,
    make_decision,
)
from gateway.limits.periods import PeriodCache
from gateway.limits.resp import ScriptPipeline, pack

HIT_SCRIPT = files("gateway.limits").joinpath("hit.lua").read_text(encoding="utf-8")
HIT_SCRIPT_SHA = hashlib.sha1(HIT_SCRIPT.encode("utf-8")).hexdigest()
_HIT_SCRIPT_SHA_BYTES = HIT_SCRIPT_SHA.encode("ascii")

_OUTCOMES: tuple[Outcome, ...] = ("allowed", "throttled", "quota_exceeded")
# A quota counter outlives its period a little so that a gateway whose clock lags still
# counts into the same key instead of starting a fresh one.
_QUOTA_GRACE_SECONDS = 60.0
# Subjects whose EVALSHA is kept ready; subjects come from the config, so this bound only
# matters across reloads that retire many keys.
_MAX_COMMANDS = 10_000
_new_tuple = tuple.__new__

AnyRedis = Redis | RedisCluster
T = TypeVar("T")


def rate_key(subject: str) -> str:
    return f"gw:{{{subject}}}:rate"


def quota_key(subject: str, period_start: float) -> str:
    return f"gw:{{{subject}}}:quota:{int(period_start)}"


def connect(url: str, timeout: float) -> AnyRedis:
    """A client for `url` (redis://, rediss://, redis+cluster://, rediss+cluster://)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
    }
    for cluster_scheme, plain_scheme in (
        ("redis+cluster://", "redis://"),
        ("rediss+cluster://", "rediss://"),
    ):
        if url.startswith(cluster_scheme):
            return RedisCluster.from_url(plain_scheme + url[len(cluster_scheme) :], **options)
    if url.startswith(("redis://", "rediss://")):
        # No retries: the pool reconnects on the next call anyway. No socket timeout: every
        # call on this client already runs under an asyncio timeout of `timeout`
        # (RedisLimiter._guard), and redis-py would add a timer to every write and read.
        options["socket_timeout"] = None
        return Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)
    raise ValueError(f"not a Redis URL: {url!r}")


class _Command:
    """One subject's EVALSHA of `hit.lua`: the same keys and numbers on every hit of a
    subject within one quota period, so it is built (and packed) once per period."""

    __slots__ = ("args", "keys", "packed", "shape")

    def __init__(
        self, shape: _Shape, keys: tuple[str, str], args: tuple[int, ...], packed: bytes
    ) -> None:
        self.shape = shape
        self.keys = keys
        self.args = args
        self.packed = packed


# (rate limit, rate window, quota limit, period start, period end): what a command follows from.
_Shape = tuple[int, float, int, float, float]


class _DirectHits:
    """One EVALSHA per call: redis-py refuses EVALSHA in a cluster pipeline, and the calls of
    one tick mostly go to different nodes anyway."""

    def __init__(self, client: AnyRedis) -> None:
        self._client = client

    async def run(self, command: _Command) -> Any:
        keys, args = command.keys, command.args
        try:
            return await self._client.evalsha(HIT_SCRIPT_SHA, 2, *keys, *args)
        except NoScriptError:
            # The node lost its script cache (restart, failover): NOSCRIPT means the script
            # did not run, so running it again after loading is safe.
            await self._client.script_load(HIT_SCRIPT)
            return await self._client.evalsha(HIT_SCRIPT_SHA, 2, *keys, *args)


class RedisLimiter:
    """A `Limiter` shared by every gateway process that uses the same Redis."""

    def __init__(
        self,
        client: AnyRedis,
        timeout: float,
        on_storage_error: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._on_storage_error = on_storage_error
        self._clock = clock
        self._periods = PeriodCache()
        self._commands: dict[str, _Command] = {}
        self._is_cluster = isinstance(client, RedisCluster)
        # On a single Redis the hits of one tick go out together on a connection of their
        # own, each batch under the storage timeout already; on a cluster each hit is its
        # own redis-py call under _guard.
        self._pipeline: ScriptPipeline | None = None
        self._direct: _DirectHits | None = None
        if isinstance(client, Redis):
            self._pipeline = ScriptPipeline(client, HIT_SCRIPT, timeout)
            encoder = client.get_encoder()  # type: ignore[no-untyped-call]
            self._encoding: str = encoder.encoding
            self._encoding_errors: str = encoder.encoding_errors
        else:
            self._direct = _DirectHits(client)

    @classmethod
    def from_config(
        cls, storage: StorageConfig, on_storage_error: Callable[[str], None] | None = None
    ) -> RedisLimiter:
        return cls(connect(storage.url, storage.timeout), storage.timeout, on_storage_error)

    async def hit(self, subject: str, rate: RateRule | None, quota: QuotaRule | None) -> Decision:
        now = self._clock()
        if quota is not None:
            start, end = self._periods.period(now, quota.per, quota.timezone)
            shape = (
                rate.limit if rate is not None else -1,
                rate.window if rate is not None else 0.0,
                quota.limit,
                start,
                end,
            )
            command = self._commands.get(subject)
            if command is None or command.shape != shape:
                command = self._remember_command(subject, shape)
        elif rate is not None:
            # Without a quota the (unused) quota key and expiry follow the clock: no reuse.
            start = end = now
            command = self._command(subject, (rate.limit, rate.window, -1, now, now))
        else:
            return Decision("allowed", None, None)

        pipeline = self._pipeline
        if pipeline is not None:
            try:
                reply = await pipeline.run(command.packed)
            except Exception as exc:
                raise self._storage_error("hit", exc) from exc
        else:
            direct = cast(_DirectHits, self._direct)
            reply = await self._guard("hit", lambda: direct.run(command))
        # Integer replies: redis-py hands them over as ints already.
        code, used, in_window, wait_us = reply

        rate_state = None
        if rate is not None:
            limit = rate.limit
            rate_state = _new_tuple(
                WindowState,
                (
                    limit,
                    limit - in_window if in_window < limit else 0,
                    wait_us / 1_000_000 if wait_us > 0 else 0.0,
                    rate.window,
                ),
            )
        quota_state = None
        if quota is not None:
            limit = quota.limit
            quota_state = _new_tuple(
                WindowState,
                (
                    limit,
                    limit - used if used < limit else 0,
                    end - now if end > now else 0.0,
                    end - start,
                ),
            )
        if code == 0:
            return _new_tuple(Decision, ("allowed", rate_state, quota_state, 0.0))
        return make_decision(_OUTCOMES[code], rate_state, quota_state)

    def _remember_command(self, subject: str, shape: _Shape) -> _Command:
        if len(self._commands) >= _MAX_COMMANDS:
            self._commands.clear()
        command = self._commands[subject] = self._command(subject, shape)
        return command

    def _command(self, subject: str, shape: _Shape) -> _Command:
        rate_limit, rate_window, quota_limit, start, end = shape
        window_us = round(rate_window * 1_000_000)  # 0 without a rate
        expire_at_ms = round((end + min(_QUOTA_GRACE_SECONDS, end - start)) * 1000)
        args = (rate_limit, window_us, quota_limit, expire_at_ms)
        keys = (rate_key(subject), quota_key(subject, start))
        packed = b""  # redis-py packs each call of a cluster itself
        if self._pipeline is not None:
            # Once per subject and quota period, so the plain packer is fast enough.
            encoding, errors = self._encoding, self._encoding_errors
            packed = pack(
                b"EVALSHA",
                _HIT_SCRIPT_SHA_BYTES,
                b"2",
                *(key.encode(encoding, errors) for key in keys),
                *(str(arg).encode("ascii") for arg in args),
            )
        return _Command(shape, keys, args, packed)

    async def usage(self, subject: str, quota: QuotaRule) -> QuotaUsage:
        start, end = self._periods.period(self._clock(), quota.per, quota.timezone)
        raw = await self._guard("usage", lambda: self._client.get(quota_key(subject, start)))
        used = int(raw or 0)
        return QuotaUsage(
            limit=quota.limit, used=used, remaining=max(0, quota.limit - used), reset_at=end
        )

    async def reset_quota(self, subject: str, quota: QuotaRule) -> None:
        start, _ = self._periods.period(self._clock(), quota.per, quota.timezone)
        await self._guard("reset", lambda: self._client.delete(quota_key(subject, start)))

    async def ping(self) -> None:
        await self._guard("ping", self._client.ping)

    async def close(self) -> None:
        if self._pipeline is not None:
            await self._pipeline.close()
        await self._client.aclose()

    async def _guard(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run one storage call within the timeout; any failure becomes StorageError."""
        try:
            async with asyncio.timeout(self._timeout):
                if self._is_cluster:
                    # Commands sent before the client knows the slot map are routed to an
                    # arbitrary node, and the reinitialisation their MOVED replies trigger
                    # closes connections under concurrent calls (redis-py 8 raises
                    # AttributeError there). Learning the map first avoids both; it is a
                    # no-op once the map is known.
                    await cast(RedisCluster, self._client).initialize()
                return await call()
        except Exception as exc:
            raise self._storage_error(operation, exc) from exc

    def _storage_error(self, operation: str, exc: Exception) -> StorageError:
        """Count the failure; whatever the client raised, from its own errors to the odd
        internal one under a broken connection, the request path must see StorageError."""
        if self._on_storage_error is not None:
            self._on_storage_error(operation)
        reason = (
            "timed out"
            if isinstance(exc, TimeoutError | RedisTimeoutError)
            else str(exc) or type(exc).__name__
        )
        return StorageError(f"limit storage {operation}: {reason}")
