"""An upstream HTTP client (gateway.http.client) aimed at a test's own upstream on loopback, and
the reads the client tests repeat."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.config.model import Upstream
from gateway.http.client import HttpClient

# The one header line every request here carries.
HOST = [(b"Host", b"upstream")]


def upstream_at(port: int, **options: float) -> Upstream:
    return Upstream(
        url=f"http://127.0.0.1:{port}",
        scheme="http",
        host="127.0.0.1",
        port=port,
        base_path="",
        connect_timeout=options.get("connect_timeout", 1.0),
        timeout=options.get("timeout", 2.0),
    )


@asynccontextmanager
async def client_for(port: int, **options: float) -> AsyncIterator[HttpClient]:
    keepalive = options.pop("keepalive", 30.0)
    client = HttpClient(upstream_at(port, **options), keepalive=keepalive)
    try:
        yield client
    finally:
        await client.close()


async def body_chunks(reply: object) -> list[bytes]:
    """The answer's body as the client hands it over, chunk by chunk."""
    chunks = []
    while chunk := await reply.read():  # type: ignore[attr-defined]
        chunks.append(chunk)
    return chunks


async def fetch(client: HttpClient, method: str = "GET") -> tuple[int, bytes]:
    """One request without a body to `/x`: the status and the whole body."""
    reply = await client.send(method, "/x", HOST, None)
    body = b"".join(await body_chunks(reply))
    reply.finish()
    return reply.status, body
