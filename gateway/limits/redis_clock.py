"""What the gateway knows of one Redis server's clock, for the deadlines of its limit checks.

A stalled Redis (a slow command, a frozen process) runs the checks written to it when it wakes,
long after the gateway answered their requests without them (503, or admitted without limits
under `on_error: allow` or `local`). Each check therefore carries a deadline on the server's
own clock, and `hit.lua` takes nothing after it. The gateway's clock may differ from the
server's by any amount: the offset between them is learnt from the server's `TIME` and from the
time each reply carries.
"""

from __future__ import annotations

from typing import Any

# How long the best sample of a server's clock is trusted before a newer one may replace it
# (clocks are adjusted).
_SAMPLE_KEPT = 10.0
# The share of the timeout a check is given: the rest is for its reply to come back. A Redis
# that wakes from a stall runs its backlog and writes the replies of a read only after running
# all of it (~60 µs a hit here): a check run at the very end of the timeout was answered too
# late, and a request answered 503 was charged (measured: 6-157 of them per stall at 150
# connections).
DEADLINE_SHARE = 0.8


def time_reply_us(reply: Any) -> int:
    """Redis's answer to `TIME` (seconds and microseconds, as bytes or numbers), in
    microseconds."""
    seconds, microseconds = reply
    return int(seconds) * 1_000_000 + int(microseconds)


class RedisClock:
    """The offset of one server's clock from the event loop's (`loop.time()`)."""

    __slots__ = ("_offset", "_until")

    def __init__(self) -> None:
        self._offset: float | None = None  # the server's time minus the loop's, in seconds
        self._until = 0.0

    def deadline_us(self, now: float, timeout: float) -> int:
        """The deadline, in microseconds on the server's clock, for a check sent at loop time
        `now` that the gateway waits `timeout` for; 0 (none) while the clock is unknown."""
        offset = self._offset
        if offset is None:
            return 0
        return int((now + timeout * DEADLINE_SHARE + offset) * 1_000_000)

    def learn(self, server_us: int, now: float, new_server: bool = False) -> None:
        """A time the server stamped (microseconds), read at loop time `now`. It is read a
        moment after the server stamped it, so each sample is at most the true offset, short
        by that moment: the largest recent one is the best (deadlines err early: a check may be
        refused a little before the gateway would have given up, never after). `new_server`
        (a new connection, perhaps to another server after a failover) starts afresh."""
        sample = server_us / 1_000_000 - now
        offset = self._offset
        if new_server or offset is None or sample > offset or now > self._until:
            self._offset = sample
            self._until = now + _SAMPLE_KEPT
