"""The shared limit storage: Redis or Redis Cluster, for several gateway processes.

One request costs one EVALSHA of `hit.lua`, which checks and consumes the rate and the quota
atomically on the server. The script runs on Redis's clock, so gateways with skewed clocks
agree on the sliding window; the quota period is computed here because it needs the plan's
timezone. Both keys of a subscription carry the subject as hash tag, so they live in one
cluster slot.

On a single Redis, the calls made in the same event-loop tick are sent together as one
pipeline (redis-py refuses EVALSHA in a cluster pipeline, so on a cluster each call is its
own EVALSHA, sent concurrently). Every call is
bounded by `storage.timeout`, and every failure leaves as `StorageError`; the connection pool
reconnects by itself on a later call once Redis is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib.resources import files
from typing import Any, Protocol, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
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

HIT_SCRIPT = files("gateway.limits").joinpath("hit.lua").read_text(encoding="utf-8")
HIT_SCRIPT_SHA = hashlib.sha1(HIT_SCRIPT.encode("utf-8")).hexdigest()
# EVALSHA <sha> 2 <rate key> <quota key> <4 numbers>, in RESP: the part every hit shares.
_EVALSHA_PREFIX = b"*9\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n$1\r\n2\r\n" % HIT_SCRIPT_SHA.encode()

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
        # No retries: a retried EVALSHA whose reply was lost would consume twice, and the
        # pool reconnects on the next call anyway. No socket timeout: every call on this
        # client already runs under an asyncio timeout of `timeout` (RedisLimiter._guard, or
        # the batch a hit joins), and redis-py would add a timer to every write and to every
        # reply it reads, batched or not.
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
_Call = tuple[bytes, "asyncio.Future[Any]"]  # a packed command and where its reply goes


class _HitScript(Protocol):
    def pack(self, keys: tuple[str, str], args: tuple[int, ...]) -> bytes: ...

    async def run(self, command: _Command) -> Any: ...

    async def close(self) -> None: ...


class _DirectHits:
    """One EVALSHA per call: redis-py refuses EVALSHA in a cluster pipeline, and the calls of
    one tick mostly go to different nodes anyway."""

    def __init__(self, client: AnyRedis) -> None:
        self._client = client

    def pack(self, keys: tuple[str, str], args: tuple[int, ...]) -> bytes:
        return b""  # redis-py packs each call itself

    async def run(self, command: _Command) -> Any:
        keys, args = command.keys, command.args
        try:
            return await self._client.evalsha(HIT_SCRIPT_SHA, 2, *keys, *args)
        except NoScriptError:
            # The node lost its script cache (restart, failover): NOSCRIPT means the script
            # did not run, so running it again after loading is safe.
            await self._client.script_load(HIT_SCRIPT)
            return await self._client.evalsha(HIT_SCRIPT_SHA, 2, *keys, *args)

    async def close(self) -> None:
        return None


class _PipelinedHits:
    """Sends the calls queued during one event-loop tick together, on one pooled connection.

    The batch is written and read with redis-py's connection-level calls instead of its
    `Pipeline`: a pipeline packs every argument of every command through the encoder and
    wraps each reply's read in a timer of its own, which cost more per hit than the rest of
    the limit step, while the EVALSHA commands here differ only in their keys and numbers
    and the whole batch already runs under one timeout.
    """

    def __init__(self, client: Redis, timeout: float) -> None:
        self._client = client
        self._pool = client.connection_pool
        encoder = client.get_encoder()  # type: ignore[no-untyped-call]
        self._encoding: str = encoder.encoding
        self._encoding_errors: str = encoder.encoding_errors
        self._timeout = timeout
        self._queue: list[_Call] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, command: _Command) -> Any:
        queue = self._queue
        if queue and self._loop is not None:
            # Joining the batch of this tick, on the loop that started it: asking for the
            # running loop again would cost a getpid() system call per hit on Python 3.11.
            reply: asyncio.Future[Any] = self._loop.create_future()
        else:
            loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)
            reply = loop.create_future()
        queue.append((command.packed, reply))
        # A caller that stops waiting cancels its future; _send skips it.
        return await reply

    async def close(self) -> None:
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)

    def _flush(self) -> None:
        calls, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send(calls))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, calls: list[_Call]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._evalsha_all(calls)
        except asyncio.CancelledError:
            for _, future in calls:
                if not future.done():
                    future.set_exception(RedisConnectionError("the limiter was closed"))
            raise
        except Exception as exc:  # handed to every caller, who translates it
            for _, future in calls:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(calls, replies, strict=True):
            if future.done():  # the caller gave up waiting
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _evalsha_all(self, calls: Sequence[_Call]) -> list[Any]:
        try:
            replies = await self._round_trip(calls)
        except RedisConnectionError:
            # A pooled connection that a restarted Redis had dropped fails with nothing run
            # on the server that answers now; one more try, on another connection, inside
            # the same storage timeout, spares the batch a 503.
            replies = await self._round_trip(calls)
        # After a Redis restart the script cache is empty; a NOSCRIPT reply means the
        # script did not run, so running it again is safe.
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:
            await self._client.script_load(HIT_SCRIPT)
            retried = await self._round_trip([calls[i] for i in unknown])
            for i, reply in zip(unknown, retried, strict=True):
                replies[i] = reply
        return replies

    async def _round_trip(self, calls: Sequence[_Call]) -> list[Any]:
        """Every call's EVALSHA in one write, then every reply; error replies are returned."""
        packed = b"".join([command for command, _ in calls])
        connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(packed)
            replies: list[Any] = []
            for _ in calls:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:  # this command's own error; the rest still come
                    replies.append(exc)
            return replies
        except BaseException:
            # Replies left unread would be served to the connection's next user.
            await connection.disconnect(nowait=True)
            raise
        finally:
            # Shielded as redis-py's pipeline does: a second cancellation must not leave the
            # pool's in-use bookkeeping half updated.
            await asyncio.shield(self._pool.release(connection))

    def pack(self, keys: tuple[str, str], args: tuple[int, ...]) -> bytes:
        rate_key, quota_key = (key.encode(self._encoding, self._encoding_errors) for key in keys)
        rate_limit, window_us, quota_limit, expire_at_ms = (str(arg) for arg in args)
        return b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
            _EVALSHA_PREFIX,
            len(rate_key),
            rate_key,
            len(quota_key),
            quota_key,
        ) + (
            f"${len(rate_limit)}\r\n{rate_limit}\r\n${len(window_us)}\r\n{window_us}\r\n"
            f"${len(quota_limit)}\r\n{quota_limit}\r\n"
            f"${len(expire_at_ms)}\r\n{expire_at_ms}\r\n"
        ).encode("ascii")


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
        # On a single Redis the hits join a batch that runs under the storage timeout
        # already; a second timer per hit would only cost time.
        self._batched = isinstance(client, Redis)
        self._script: _HitScript = (
            _PipelinedHits(client, timeout) if isinstance(client, Redis) else _DirectHits(client)
        )

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

        if self._batched:
            try:
                reply = await self._script.run(command)
            except Exception as exc:
                raise self._storage_error("hit", exc) from exc
        else:
            reply = await self._guard("hit", lambda: self._script.run(command))
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
        return _Command(shape, keys, args, self._script.pack(keys, args))

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
        await self._script.close()
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
