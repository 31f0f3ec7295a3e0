"""A real gateway worker on free loopback ports, inside the test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from gateway.config import load_config
from gateway.server import Worker


@asynccontextmanager
async def running_gateway(
    config_dir: Path, *, watch: bool = False, env: dict[str, str] | None = None
) -> AsyncIterator[Worker]:
    """`env`: what the config is loaded with in place of the environment (GATEWAY_ADMIN_TOKEN,
    GATEWAY_REDIS_URL); none of the test process's own."""
    config = load_config(config_dir, env=env or {})
    worker = Worker(str(config_dir) if watch else None, config, supervised=False)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.drain()
