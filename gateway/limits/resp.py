"""A pipelined RESP connection that runs Lua scripts by EVALSHA on a single Redis.

Why not redis-py for the limiter's hits: every request costs one EVALSHA, and redis-py's
asyncio path (a task per batch, a shielded pool release, a layered read per reply,
StreamWriter's write and drain) cost about 3 µs of CPU per request beyond the in-memory
limiter. Here the calls of one event-loop tick become one `transport.write` on one
`asyncio.Protocol`, and `data_received` hands each reply, parsed by hiredis, to the next
waiting future: no task, timer or coroutine per batch or per reply.

Replies come back in the order of the calls. When a batch misses its deadline, its calls
fail, the connection takes no new calls (the next call reconnects), and it goes on reading:
the calls written after that batch wait for their own deadlines, since a stalled Redis that
wakes runs them (each in its own time on Redis's clock) whether or not anyone reads the
replies. Once every call on it is answered or past its deadline, it is dropped. One timer
per connection watches the earliest deadline of the batches in flight. A NOSCRIPT
reply (a restarted or flushed Redis) loads the scripts and runs those calls again on the
same connection, where the load is sure to precede them. Everything else the limiter asks
(usage, reset, ping) stays on redis-py, whose URL settings this module reuses.

A Redis that gives no answer at all (frozen, or cut off by a network partition that resets
nothing) would make every call wait the whole timeout. Once an attempt to connect got no
answer in time, calls fail at once instead, while one attempt at a time goes on trying to
reach Redis (started by the calls themselves: no traffic, no attempts); the first that Redis
answers ends it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from ssl import SSLContext
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.limits.abandoned_calls import NO_REPLY, AbandonedCalls
from gateway.limits.redis_clock import RedisClock, time_reply_us
from gateway.tasks import STEP_TIMEOUT, stop_tasks

# A call: where its reply goes (None: a reply nobody waits for) and its packed command,
# empty once the call may not be retried.
_Call = tuple["asyncio.Future[Any] | None", bytes]
# uvloop rounds timers to the millisecond and may fire that much early.
_TIMER_SLACK = 0.001
# Hits of one tick beyond this many go out in another write. Measured in the bench (one core
# for the gateway, Redis sharing the other with the load): 16 kept both busy; smaller batches
# cost more writes than they saved, larger ones brought back the idle turns.
MAX_BATCH = 16


def pack(*args: bytes) -> bytes:
    """One command in RESP."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(arg), arg) for arg in args)


_PING = pack(b"PING")
# An error made afresh for each batch: one instance raised again and again grows its traceback.
_UNANSWERED = "Redis did not answer the last attempt to connect within the timeout; trying again"
_TIME = pack(b"TIME")
# A call's deadline as the last argument of its script, when Redis's clock is not known yet.
_NO_DEADLINE = pack(b"0")[len(b"*1\r\n") :]


class ScriptPipeline:
    """Runs packed EVALSHA commands of the given scripts on one lazily opened connection, each
    call bounded by `timeout` from the end of the tick it was made in."""

    def __init__(
        self,
        client: Redis,
        scripts: Sequence[str],
        timeout: float,
        address: Callable[[], Awaitable[tuple[str, int]]],
        recheck_address_every: float | None = None,
    ) -> None:
        """`address` says where to connect, asked on every (re)connection: behind Sentinel
        the master moves, and a lost connection is the sign to ask again. A lost connection
        is not the only sign: after a failover ordered while the old master is alive, that
        master goes on accepting writes until the Sentinels get round to demoting it (up to
        their 10 s INFO period), and what it takes then is lost. So, with
        `recheck_address_every`, a connected pipeline asks again that often, and leaves a
        master that is no longer the one named."""
        self._address = address
        self._recheck_every = recheck_address_every
        self._rechecking: asyncio.Task[None] | None = None
        self._closed = False  # ends `_recheck` should its cancellation be lost
        # A connection object that is never connected: redis-py's reading of the URL.
        settings = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        self._ssl: SSLContext | None = (
            settings.ssl_context.get() if isinstance(settings, SSLConnection) else None
        )
        handshake = []
        if settings.password:
            credentials = [settings.password.encode()]
            if settings.username:
                credentials.insert(0, settings.username.encode())
            handshake.append(pack(b"AUTH", *credentials))
        if settings.client_name:
            handshake.append(pack(b"CLIENT", b"SETNAME", settings.client_name.encode()))
        if settings.db:
            handshake.append(pack(b"SELECT", str(settings.db).encode()))
        # Hits go out only once Redis has answered on the new connection. The kernel accepts
        # connections for a Redis that is stalled (a slow command, a frozen process), and
        # hits written into one would run when Redis wakes, long after their requests were
        # answered 503: units and rate taken for requests that were refused.
        handshake.append(_PING)
        # And Redis's clock, for the deadlines of the calls on this server (see `deadline`).
        handshake.append(_TIME)
        self._handshake = handshake
        self._redis_clock = RedisClock()
        self._script_loads = [pack(b"SCRIPT", b"LOAD", script.encode()) for script in scripts]
        self._timeout = timeout
        self._queue: list[_Call] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: _Connection | None = None
        # Connections that missed a deadline: no new calls, still reading (see `_Connection`).
        self._retiring: set[_Connection] = set()
        self._connecting: asyncio.Task[None] | None = None
        # The last attempt to connect got no answer within the timeout: calls fail at once
        # until an attempt is answered (see the module docstring).
        self._unanswered = False
        self._waiting: list[tuple[list[_Call], float]] = []  # batches (and deadlines) to send
        # Calls whose callers stopped waiting, and where their replies go (`when_answered`).
        self._abandoned = AbandonedCalls()

    def run(self, packed: bytes) -> asyncio.Future[Any]:
        """The reply to `packed`; error replies and failures come as its exception."""
        loop = self._loop
        if loop is None:
            # Kept: asking for the running loop costs a getpid() system call on Python 3.11.
            loop = self._loop = asyncio.get_running_loop()
        future = loop.create_future()
        queue = self._queue
        if not queue:
            loop.call_soon(self._flush)
        queue.append((future, packed))
        if len(queue) >= MAX_BATCH:
            # Written now rather than at the end of the tick: Redis starts on these while
            # the gateway prepares the rest. One batch of a whole busy tick left both sides
            # waiting on each other in turns (14% idle on the gateway's core in the bench).
            self._flush()
        return future

    def when_answered(self, future: asyncio.Future[Any], late: Callable[[Any], None]) -> None:
        """`late` gets the reply to the call of `future`, whose caller stopped waiting (it was
        cancelled) while the call was on its way; a call that fails gets nothing."""
        if not future.done():
            future.cancel()  # stays so: the reply goes to `late`
        elif not future.cancelled():
            # Answered already, before the caller could take it (cancelled in that turn):
            # told once the caller has finished unwinding, as a later reply would be.
            if future.exception() is None:
                future.get_loop().call_soon(late, future.result())
            return
        self._abandoned.wanted(future, late)

    def deadline(self) -> bytes:
        """The deadline of a call made now on Redis's clock (see `limits/redis_clock.py`),
        packed as a script's last argument; 0 while Redis's clock is unknown."""
        loop = self._loop
        if loop is None:
            return _NO_DEADLINE
        at = self._redis_clock.deadline_us(loop.time(), self._timeout)
        if not at:
            return _NO_DEADLINE
        text = b"%d" % at
        return b"$%d\r\n%b\r\n" % (len(text), text)

    def learn_redis_time(self, redis_us: int, new_server: bool = False) -> None:
        """A time Redis stamped (a reply's, or TIME's on a new connection), in microseconds."""
        loop = self._loop
        if loop is not None:
            self._redis_clock.learn(redis_us, loop.time(), new_server)

    def _flush(self) -> None:
        calls, self._queue = self._queue, []
        if not calls:  # sent already as a full batch, or closed meanwhile
            return
        loop = self._loop
        assert loop is not None
        deadline = loop.time() + self._timeout
        connection = self._connection
        if connection is not None and connection.alive:
            connection.send(calls, deadline)
            return
        # Known dead (or never opened): reconnect before writing, within the same deadline.
        if connection is not None and not connection.closed.done():
            # Retired after a missed deadline: it still reads the replies of its later calls.
            self._retiring.add(connection)
            connection.closed.add_done_callback(lambda _: self._retiring.discard(connection))
        self._connection = None
        if self._unanswered:
            # Redis left the last attempt unanswered: these would most likely wait the whole
            # timeout for nothing. They fail now, and an attempt finds out if Redis is back.
            _fail(calls, RedisConnectionError(_UNANSWERED), self._abandoned)
        else:
            self._waiting.append((calls, deadline))
        if self._connecting is None:
            self._connecting = loop.create_task(self._connect(loop))

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        connection: _Connection | None = None
        # The earliest deadline of the calls waiting for it; with none (calls failing at once
        # while Redis does not answer), a timeout of its own.
        deadline = self._waiting[0][1] if self._waiting else loop.time() + self._timeout
        try:
            async with asyncio.timeout_at(deadline):
                address = await self._address()
                host, port = address
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop, self._script_loads, self._abandoned),
                    host,
                    port,
                    ssl=self._ssl,
                )
                replies = [loop.create_future() for _ in self._handshake]
                handshake: list[_Call] = list(zip(replies, self._handshake, strict=True))
                connection.send(handshake, deadline)
                answers = await asyncio.gather(*replies, return_exceptions=True)
                for packed, reply in zip(self._handshake, answers, strict=True):
                    # Any answer to the PING will do, an ACL's refusal too: it only shows
                    # that Redis is reading. TIME refused (an ACL) leaves calls without a
                    # deadline until a script's reply tells the time.
                    refused = packed in (_PING, _TIME) and isinstance(reply, ResponseError)
                    if isinstance(reply, BaseException) and not refused:
                        raise reply
                    if packed is _TIME and not isinstance(reply, BaseException):
                        self.learn_redis_time(time_reply_us(reply), new_server=True)
        except BaseException as exc:
            if connection is not None:
                connection.abort(RedisConnectionError("the handshake failed"))
            # A refusal or a reset is quick to come back: only silence is worth failing fast for.
            self._unanswered = isinstance(exc, TimeoutError)
            if isinstance(exc, Exception):
                self._fail_waiting(exc)
                return  # each waiting caller gets the error; the task has nothing to report
            self._fail_waiting(RedisConnectionError("the limiter was closed"))
            raise
        finally:
            self._connecting = None
        assert connection is not None
        if self._closed:  # closed meanwhile, its cancellation lost (see gateway.tasks)
            connection.close(RedisConnectionError("the limiter was closed"))
            self._fail_waiting(RedisConnectionError("the limiter was closed"))
            return
        self._connection = connection
        self._unanswered = False
        waiting, self._waiting = self._waiting, []
        for calls, deadline in waiting:
            connection.send(calls, deadline)
        if self._recheck_every is not None:
            if self._rechecking is not None:
                self._rechecking.cancel()
            self._rechecking = loop.create_task(self._recheck(connection, address))

    async def _recheck(self, connection: _Connection, address: tuple[str, int]) -> None:
        assert self._recheck_every is not None
        # `_closed` too: asking the Sentinels can lose the cancellation (see gateway.tasks).
        while connection.alive and not self._closed:
            await asyncio.sleep(self._recheck_every)
            try:
                async with asyncio.timeout(self._timeout * 4):
                    now = await self._address()
            except Exception:
                continue
            if self._closed:
                return
            if now != address:
                # Calls in flight fail (503 at worst); the next one connects to `now`.
                connection.close(RedisConnectionError(f"the master moved to {now[0]}:{now[1]}"))
                return

    def _fail_waiting(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, []
        for calls, _ in waiting:
            _fail(calls, error, self._abandoned)

    async def close(self) -> None:
        self._closed = True
        closed = RedisConnectionError("the limiter was closed")
        queued, self._queue = self._queue, []
        _fail(queued, closed, self._abandoned)
        tasks = (self._connecting, self._rechecking)
        await stop_tasks(tasks, STEP_TIMEOUT, "the limiter's connecting to Redis")
        for retiring in list(self._retiring):
            retiring.abort(closed)
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close(closed)
            # Bounded: a close waits for the write buffer to empty, into a Redis that may not read.
            _, open_still = await asyncio.wait({connection.closed}, timeout=STEP_TIMEOUT)
            if open_still:
                connection.abort(closed)


class _Connection(asyncio.Protocol):
    """One Redis connection: calls written in batches, replies matched to them in order."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        script_loads: list[bytes],
        abandoned: AbandonedCalls,
    ) -> None:
        self._loop = loop
        self._script_loads = script_loads
        self._abandoned = abandoned  # the pipeline's: see ScriptPipeline.when_answered
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._transport: asyncio.Transport | None = None
        self._pending: deque[_Call] = deque()
        self._sent = 0  # calls written so far, the batch ends below count in the same units
        self._answered = 0
        self._batches: deque[tuple[float, int]] = deque()  # (deadline, end) of those unanswered
        self._timer: asyncio.TimerHandle | None = None
        self._loading = 0  # SCRIPT LOADs written and unanswered
        # A batch missed its deadline: no new calls; dropped once the rest are answered or due.
        self._retired = False
        self.closed: asyncio.Future[None] = loop.create_future()

    @property
    def alive(self) -> bool:
        transport = self._transport
        return transport is not None and not transport.is_closing() and not self._retired

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, calls: list[_Call], deadline: float) -> None:
        if not self.alive:  # lost since it was last looked at (or retired: _check_deadline)
            _fail(calls, RedisConnectionError("connection to Redis lost"), self._abandoned)
            return
        transport = self._transport
        assert transport is not None  # alive
        transport.write(b"".join([packed for _, packed in calls]))
        self._pending.extend(calls)
        self._sent += len(calls)
        self._batches.append((deadline, self._sent))
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        retries: list[_Call] = []
        answered = 0
        demoted = False
        try:
            while (reply := reader.gets()) is not False:
                future, packed = pending.popleft()
                answered += 1
                if future is None:
                    self._loading -= 1
                elif future.done():  # its caller stopped waiting
                    self._abandoned.settled(future, reply)
                elif type(reply) is not ResponseError:
                    future.set_result(reply)
                elif packed and str(reply).startswith("NOSCRIPT"):
                    # The script did not run: after loading it, running it again is safe.
                    retries.append((future, packed))
                else:
                    # READONLY: the master this connection reached is a replica now.
                    demoted = demoted or str(reply).startswith("READONLY")
                    future.set_exception(reply)
        except Exception as exc:  # a reply nobody asked for, or bytes that are not RESP
            self.abort(RedisConnectionError(f"unexpected data from Redis: {exc!r}"))
            return
        if demoted:
            # Dropped so that the next call reconnects to wherever the master is now.
            self.abort(RedisConnectionError("the master became a replica"))
            return
        self._answered += answered
        batches = self._batches
        if retries:
            # As late as the newest batch in flight, so that deadlines stay in order.
            self._resend(retries, batches[-1][0])
        while batches and batches[0][1] <= self._answered:
            batches.popleft()
        if self._retired and not batches:
            # Every call on it is answered, or past its deadline (and so takes nothing now).
            self.abort(RedisConnectionError("retired after a missed deadline"))

    def _resend(self, retries: list[_Call], deadline: float) -> None:
        calls: list[_Call] = []
        if not self._loading:
            calls = [(None, load) for load in self._script_loads]
            self._loading = len(calls)
        # Sent without their packed command in the queue: a second NOSCRIPT is an error.
        self._transport.write(b"".join([c for _, c in calls] + [c for _, c in retries]))  # type: ignore[union-attr]
        for future, _ in retries:
            calls.append((future, b""))
        self._pending.extend(calls)
        self._sent += len(calls)
        self._batches.append((deadline, self._sent))

    def _check_deadline(self) -> None:
        # The timer is left running when its batch is answered: cancelling costs more than
        # the rare wake-up that finds nothing to do.
        self._timer = None
        batches = self._batches
        while batches and batches[0][1] <= self._answered:
            batches.popleft()
        now = self._loop.time()
        overdue = 0  # the end of the last batch past its deadline
        while batches and batches[0][0] - now < _TIMER_SLACK:
            overdue = batches.popleft()[1]
        if overdue:
            # Its calls fail now (503). The calls written after it are not failed with it:
            # each carries its own deadline on Redis's clock, and a Redis that wakes within it
            # runs it, whether or not the gateway still reads (aborting here answered them 503
            # and Redis took their units all the same). So the connection takes no new calls
            # and reads on, its replies still matched in order, each call failing at its own
            # deadline at the latest.
            self._retired = True
            error = TimeoutError()
            pending = self._pending
            for index in range(overdue - self._answered):
                future = pending[index][0]
                if future is not None and not future.done():
                    future.set_exception(error)
        if not batches:
            if self._retired:
                # Every call is answered or past its deadline: nothing more to read.
                self.abort(TimeoutError())
            return
        self._timer = self._loop.call_at(batches[0][0], self._check_deadline)

    def abort(self, error: Exception) -> None:
        self._fail(error)
        if self._transport is not None:
            self._transport.abort()

    def close(self, error: Exception) -> None:
        self._fail(error)
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc is not None else ""
        self._fail(RedisConnectionError(f"connection to Redis lost{reason}"))
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, error: Exception) -> None:
        pending, self._pending = self._pending, deque()
        self._batches.clear()
        _fail(pending, error, self._abandoned)


def _fail(calls: list[_Call] | deque[_Call], error: Exception, abandoned: AbandonedCalls) -> None:
    for future, _ in calls:
        if future is None:
            continue
        if not future.done():
            future.set_exception(error)
        else:
            abandoned.settled(future, NO_REPLY)
