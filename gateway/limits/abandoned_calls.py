"""Calls of a pipelined Redis connection whose callers stopped waiting (a client that left
while its limit check was on its way), and where what comes of them goes (see
`gateway.limits.resp.ScriptPipeline.when_answered`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

# What came of a call that failed: no reply.
NO_REPLY = object()


class AbandonedCalls:
    """Calls whose callers stopped waiting (cancelled: the client left), and what becomes of
    what came of them (a reply, or NO_REPLY for a failure): a reply goes to the callback the
    caller named (`ScriptPipeline.when_answered`), and is told only if it is a result.

    What comes in the turn of the cancellation, after it and before the caller (a task being
    woken with the CancelledError) could name a callback, is kept for that one turn: the
    caller names it in that step, which runs before anything called soon from here. (A
    client's connection_lost and Redis's reply in one poll of the loop: the caller then waited
    for a reply that had gone by, which held its request, and the config snapshot it was
    served with, for good, and the admission was never settled.)
    """

    __slots__ = ("_late", "_unclaimed")

    def __init__(self) -> None:
        self._late: dict[asyncio.Future[Any], Callable[[Any], None]] = {}
        self._unclaimed: dict[asyncio.Future[Any], Any] = {}

    def wanted(self, future: asyncio.Future[Any], late: Callable[[Any], None]) -> None:
        """`late` gets what comes of the cancelled call of `future`, if it is a result."""
        if future in self._unclaimed:
            _tell_soon(future, late, self._unclaimed.pop(future))
        else:
            self._late[future] = late

    def settled(self, future: asyncio.Future[Any], outcome: Any) -> None:
        """What came of the call of `future`, whose caller stopped waiting."""
        late = self._late.pop(future, None) if self._late else None
        if late is not None:
            if _is_result(outcome):
                late(outcome)
        elif future.cancelled():
            unclaimed = self._unclaimed
            unclaimed[future] = outcome
            future.get_loop().call_soon(unclaimed.pop, future, None)


def _is_result(outcome: Any) -> bool:
    return outcome is not NO_REPLY and type(outcome) is not ResponseError


def _tell_soon(future: asyncio.Future[Any], late: Callable[[Any], None], outcome: Any) -> None:
    if _is_result(outcome):
        future.get_loop().call_soon(late, outcome)
