"""aiohttp applications served on free loopback ports, inside the test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web


@asynccontextmanager
async def serving_app(app: web.Application) -> AsyncIterator[int]:
    """Serves `app` on a free loopback port until the block ends; yields the port.

    A handler is cancelled when its client hangs up: that is how the upstreams of these tests
    see the gateway give up on a request."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
