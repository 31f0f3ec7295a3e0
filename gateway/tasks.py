"""Stopping background tasks within a bound, at a worker's drain.

A cancellation can be lost. On Python 3.11 `asyncio.wait_for` returns the result of the call
it waits for when the cancellation comes after that call has finished but before the waiting
task has resumed (fixed in 3.12), and redis-py writes every command to a Sentinel (a client
with a socket timeout) through it: a loop that asks the Sentinels for the master (every 0.5 s)
then goes on as though it had never been cancelled, and whoever awaits its end waits for good.
A worker's drain hung that way, its gateway killed with -9 after the test's 15 s. So each loop
also checks a flag of its own, and each wait for a task to end is bounded here: the task is
cancelled again while it runs, and when the bound passes a warning names it and the caller goes
on without it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable

log = logging.getLogger("gateway")

# Bound on one step of closing a worker's parts (a background task's end, a client's close):
# a storage that hangs must not hold up the exit.
STEP_TIMEOUT = 1.0

# After the first cancellation a task has this share of the bound to unwind (its own bounded
# clean-up: a Redis connection closed, say) before it is cancelled again, then every
# _RECANCEL_EVERY until the bound.
_FIRST_SHARE = 0.5
_RECANCEL_EVERY = 0.05


async def stop_tasks(
    tasks: Iterable[asyncio.Task[object] | None], within: float, what: str
) -> bool:
    """Cancel `tasks` (None and finished ones skipped) and wait for their end, `within` seconds
    at most; whether they all ended. Those left running are named in a warning."""
    pending = {task for task in tasks if task is not None and not task.done()}
    if not pending:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    wait = within * _FIRST_SHARE
    while True:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(
            pending, timeout=max(0.0, min(wait, deadline - loop.time()))
        )
        if not pending:
            return True
        if loop.time() >= deadline:
            log.warning(
                "%s did not stop within %.1fs; going on without waiting for it: %s",
                what,
                within,
                ", ".join(sorted(task.get_name() + " " + _where(task) for task in pending)),
            )
            return False
        wait = _RECANCEL_EVERY


async def finish_within(step: Awaitable[object], within: float | None, what: str) -> bool:
    """Await `step` for `within` seconds at most (None: its own bounds only); whether it
    finished. One that takes longer, or fails, is named in a warning and left behind.

    A failure is one line, not a traceback: closing is best effort, and a storage client's
    close fails for reasons of the storage's (redis-py raises its own TimeoutError when a
    connection is slow to close; that ended a worker's drain with exit 1)."""
    bound = asyncio.timeout(within)
    try:
        async with bound:
            await step
    except Exception as exc:
        if bound.expired():
            log.warning("%s did not finish within %.1fs; going on without it", what, within)
        else:
            log.warning("%s failed (%s); going on without it", what, _why(exc))
        return False
    return True


def _why(exc: BaseException) -> str:
    """The exception's class and message, as one line."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    return f"{name}: {text}" if text else name


def _where(task: asyncio.Task[object]) -> str:
    """Where `task` waits, for the warning: its innermost frame."""
    stack = task.get_stack()
    if not stack:
        return repr(task.get_coro())
    frame = stack[-1]
    return f"({frame.f_code.co_name} at {frame.f_code.co_filename}:{frame.f_lineno})"
