"""Write flow control shared by the protocols that stream bodies (client and upstream sides).

asyncio calls `pause_writing` when a transport's buffer passes its high-water mark and
`resume_writing` when it drains; whoever streams a body waits on `WriteGate.drained()` between
chunks so that a slow reader bounds the memory a fast writer can fill.
"""

from __future__ import annotations

import asyncio


class WriteGate:
    __slots__ = ("_loop", "_waiter", "paused")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self.paused = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        """The connection is gone: a writer waiting for room learns it."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    async def drained(self) -> None:
        """Return once the transport takes more (at once when it is not paused)."""
        if not self.paused:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None
