"""`UpstreamClient` over aiohttp's own client session, kept for comparison and as a fallback.

The pool uses it when GATEWAY_UPSTREAM_CLIENT=aiohttp; otherwise the protocol-level client of
upstream_client.py, which does the same work at a fraction of the cost per request.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterable, Sequence

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.config.model import Upstream
from gateway.problems import BadGateway, GatewayTimeout
from gateway.upstream_client import KEEPALIVE_SECONDS
from gateway.upstream_connection import UpstreamBodyError

# aiohttp would otherwise add its own User-Agent, Accept, Accept-Encoding and a default
# Content-Type: the upstream must see the client's headers, not ours.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_READ_BUFFER = 2**17  # bigger reads cost fewer loop iterations per megabyte streamed


class _AiohttpReply:
    __slots__ = ("_product", "_response")

    def __init__(self, response: aiohttp.ClientResponse, product: str) -> None:
        self._response = response
        self._product = product

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def reason(self) -> str:
        return self._response.reason or ""

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._response.headers

    @property
    def complete(self) -> bool:
        return self._response.content.is_eof()

    @property
    def at_eof(self) -> bool:
        return self._response.content.at_eof()

    async def read(self) -> bytes:
        try:
            return await self._response.content.readany()
        except aiohttp.ServerTimeoutError as exc:
            raise UpstreamBodyError(f"The upstream of {self._product} stalled mid-answer.") from exc
        except (aiohttp.ClientError, HttpProcessingError, OSError) as exc:
            raise UpstreamBodyError(
                f"The upstream of {self._product} broke off its answer ({_describe(exc)})."
            ) from exc

    def finish(self) -> None:
        self._response.release()

    def abort(self) -> None:
        self._response.close()


def _describe(exc: BaseException) -> str:
    """A short, internals-free account of a client error for a problem detail."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        # The OS error's own message names the upstream's address: keep only its kind.
        if isinstance(exc.os_error, socket.gaierror):
            return "its host name does not resolve"
        errno = exc.os_error.errno
        return os.strerror(errno).lower() if errno else "connection failed"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed without an answer"
    if isinstance(exc, aiohttp.ClientResponseError | HttpProcessingError):
        return "invalid HTTP response"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "invalid or incomplete body"
    if isinstance(exc, ConnectionResetError) or (
        isinstance(exc, OSError) and exc.errno is not None
    ):
        return "connection reset"
    return "connection failed"


class AiohttpUpstreamClient:
    """`UpstreamClient` over aiohttp's client, one session and connection pool per upstream."""

    def __init__(self, upstream: Upstream, product: str) -> None:
        self._upstream = upstream
        self._product = product
        host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
        self._origin = f"{upstream.scheme}://{host}:{upstream.port}"
        connector = aiohttp.TCPConnector(
            limit=0,  # concurrency is bounded by the plans, not by a pool queue
            limit_per_host=0,
            keepalive_timeout=KEEPALIVE_SECONDS,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            auto_decompress=False,
            raise_for_status=False,
            trust_env=False,
            read_bufsize=_READ_BUFFER,
            # sock_read starts once the request is sent and restarts with every read: it
            # bounds both the wait for the head and any silence in the body.
            timeout=aiohttp.ClientTimeout(
                total=None, connect=upstream.connect_timeout, sock_read=upstream.timeout
            ),
        )

    async def send(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | None,
    ) -> _AiohttpReply:
        url = URL(self._origin + target, encoded=True)
        lines = CIMultiDict(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in headers
        )
        try:
            response = await self._session.request(
                method, url, headers=lines, data=body, allow_redirects=False
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise GatewayTimeout(
                f"No connection to the upstream of {self._product} "
                f"within {self._upstream.connect_timeout:g}s."
            ) from exc
        except aiohttp.ServerTimeoutError as exc:
            raise GatewayTimeout(
                f"The upstream of {self._product} did not answer "
                f"within {self._upstream.timeout:g}s."
            ) from exc
        except (aiohttp.ClientError, HttpProcessingError, OSError) as exc:
            raise BadGateway(f"The upstream of {self._product} failed: {_describe(exc)}.") from exc
        return _AiohttpReply(response, self._product)

    async def close(self) -> None:
        await self._session.close()
