"""A real gateway worker on free loopback ports, inside the test's event loop."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from gateway.config import load_config
from gateway.server import Worker

BASE_CONFIG = """
server:
  listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:0
  timeouts: {{client_header: {client_header}, client_body: {client_body}, keepalive: 5s}}
storage:
  url: {storage_url}
  timeout: {storage_timeout}
  on_error: {on_error}
"""


def write_config(
    directory: Path,
    body: str,
    *,
    storage_url: str = "memory://",
    storage_timeout: str = "250ms",
    on_error: str = "deny",
    client_header: str = "2s",
    client_body: str = "2s",
) -> Path:
    """A config folder: the server/storage file plus `body` (products, plans, keys)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "00-server.yaml").write_text(
        BASE_CONFIG.format(
            storage_url=storage_url,
            storage_timeout=storage_timeout,
            on_error=on_error,
            client_header=client_header,
            client_body=client_body,
        )
    )
    (directory / "10-api.yaml").write_text(textwrap.dedent(body))
    return directory


@asynccontextmanager
async def running_gateway(config_dir: Path, *, watch: bool = False) -> AsyncIterator[Worker]:
    config = load_config(config_dir, env={})
    worker = Worker(str(config_dir) if watch else None, config, supervised=False)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.drain()
