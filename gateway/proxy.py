"""Forwarding an admitted request to its product's upstream (step 8 of the order of checks).

`forward` streams the request body up and the answer back, chunk by chunk, never holding
either whole in memory, but for a small JSON body whose cost the route reads: that one is read
whole before its head leaves (`_read_before_head`). What goes wrong before the answer's head
reached the client is raised as an error of the HTTP layer (the pipeline makes it a 502, 504
or 408); what goes wrong after it can only cut the answer short, so the client connection is
aborted and `ForwardResult.error` says why.

`UpstreamPool` keeps one keep-alive `HttpClient` per upstream, across reloads; each config
snapshot holds a `Destination` per product, made from it once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass

from gateway.config.model import Product, Upstream
from gateway.cost_reports import BodyCost, CostReading
from gateway.http.client import IDEMPOTENT, HttpClient, ReplayableBody
from gateway.http.errors import (
    BodyTimeout,
    MalformedResponse,
    RequestBodyFailed,
    ResponseBodyError,
    SendTimeout,
)
from gateway.http.headers import (
    ExtraHeaders,
    ResponseHead,
    client_response_head,
    strip_query_param,
    switching_protocols_head,
    upstream_header_lines,
    without_length,
)
from gateway.http.reply import HttpReply
from gateway.http.request import Request
from gateway.http.tunnel import switch_and_relay

__all__ = [
    "AnswerHook",
    "CutHook",
    "Destination",
    "ForwardResult",
    "UpstreamPool",
    "forward",
]

log = logging.getLogger(__name__)

# Told (status, upstream seconds, body bytes) just before the bytes that complete the answer go
# out: once the client has its whole answer, a metrics scrape must already count it.
AnswerHook = Callable[[int, float, int], None]
# Told (upstream seconds, body bytes written, the status of the answer whose head had left, or
# None) when a streamed answer ends early because the client went away: the request is then a
# 499 whose log line still says how far it got, and whose answer began with that status.
CutHook = Callable[[float, int, int | None], None]


# The lines that ask an upstream to switch a request to WebSocket (and to nothing else).
_ASK_FOR_WEBSOCKET = ((b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"))
# RFC 6455 4.2.2: Sec-WebSocket-Accept is base64(SHA-1(the request's key + this GUID)).
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _accepts_the_key(request: Request, reply: HttpReply) -> bool:
    """Whether a 101's Sec-WebSocket-Accept answers the client's Sec-WebSocket-Key (RFC 6455
    4.1: a client fails the WebSocket otherwise). A request without a key is the client's
    business, and not checked here."""
    key = request.header(b"sec-websocket-key")
    if key is None:
        return True
    raw_key = key.strip().encode("utf-8", "surrogateescape")  # the bytes as they came
    expected = base64.b64encode(hashlib.sha1(raw_key + _WEBSOCKET_GUID).digest())
    accepts = [v.strip() for n, v in reply.raw_headers if n.lower() == b"sec-websocket-accept"]
    return accepts == [expected]


@dataclass(slots=True)
class ForwardResult:
    status: int  # the upstream's status, as sent to the client
    upstream_seconds: float  # from sending the request to the upstream's response head
    bytes_sent: int  # body bytes written to the client
    # Set when the answer was cut short after its head was sent (upstream died or stalled
    # mid-body, or the client stopped reading): the client connection has been aborted.
    error: str | None = None
    # After a protocol switch (101): bytes the client sent through the tunnel (`bytes_sent`
    # counts those the upstream sent), and whether it ended for being idle.
    bytes_received: int | None = None
    idle: bool = False


class _ClientBody:
    """The client's request body as an async iterable, each read bounded in time.

    How long the upstream may take to take each chunk is the HTTP client's to bound (by
    `upstream.timeout`, renewed while it takes bytes); time spent here waiting for the
    *client* is bounded by the client body timeout instead. Each iteration goes on where the
    one before stopped (it reads from the body's queue), so that the HTTP client can send
    a request again (see `ReplayableBody`).
    """

    __slots__ = ("_content", "_timeout", "failure")

    def __init__(self, request: Request, body_timeout: float):
        self._content = request.content
        self._timeout = body_timeout
        # Why the body could not be read; the HTTP client reports it only as a send failure.
        self.failure: Exception | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    chunk = await self._content.read()
            except TimeoutError as exc:
                self.failure = BodyTimeout(self._timeout)
                raise self.failure from exc
            except Exception as exc:
                self.failure = exc
                raise
            if not chunk:
                return
            yield chunk


@dataclass(frozen=True, slots=True)
class Destination:
    """What forwarding to one product needs, derived from its config once per snapshot."""

    product: Product
    client: HttpClient
    base_path: str
    host: bytes  # the Host header the upstream expects


class UpstreamPool:
    """One keep-alive client per upstream, shared by every snapshot that names it."""

    def __init__(self) -> None:
        # Keyed by the upstream itself too, so a reloaded product with a changed upstream or
        # timeouts gets a fresh client while an unchanged one keeps its warm connections.
        self._clients: dict[tuple[str, Upstream], HttpClient] = {}

    def destination(self, product: Product) -> Destination:
        upstream = product.upstream
        key = (product.name, upstream)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = HttpClient(upstream)
        return Destination(product, client, upstream.base_path, upstream.host_header.encode("idna"))

    def keep_only(self, destinations: Iterable[Destination]) -> None:
        """Retire the clients no destination in `destinations` (a new snapshot's) uses: their
        requests under way finish, and the pool no longer holds them. A soak audit found every
        reload that changed an https upstream left a client and its TLS context behind for
        good, ~830 KB each."""
        used = {id(destination.client) for destination in destinations}
        for key, client in list(self._clients.items()):
            if id(client) not in used:
                del self._clients[key]
                client.retire()

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()


async def forward(
    request: Request,
    destination: Destination,
    drop: frozenset[bytes],
    key_query_param: str | None,
    request_id: str,
    body_timeout: float,
    extra_response_headers: ExtraHeaders | None = None,
    on_answered: AnswerHook | None = None,
    tunnel_idle: float | None = None,
    on_cut: CutHook | None = None,
    identity: list[tuple[bytes, bytes]] | None = None,
    cost_reading: CostReading | None = None,
) -> ForwardResult:
    """Forward `request` to `destination` and stream its answer to the client.

    With `tunnel_idle` the request is a WebSocket upgrade the route lets through: it asks the
    upstream to switch too, and after its 101 bytes flow both ways until either side closes or
    none moves for `tunnel_idle` seconds; then the result has status 101. Interim answers (1xx)
    of the upstream are passed on before the final one.

    `drop` names the request headers that must not reach the upstream (hop-by-hop ones and
    the key header), `key_query_param` the query parameter that carries the key; `identity`
    holds header lines of the gateway's own to add (who called); `cost_reading` reads what
    the answer says the request cost, as it passes (its head may answer new
    `extra_response_headers`). Raises an
    `UpstreamError` when the upstream fails before its response head, `BodyTimeout` when the
    request body stalls longer than `body_timeout` before that (or whatever else the body
    raised), and lets `CancelledError` (client gone, handler cancelled) and `ConnectionError`
    (client gone while being written to) through after closing the upstream connection. Once
    the head is sent, failures are reported in `ForwardResult.error` instead, and the client
    connection is aborted.
    """
    path, query = request.raw_path, request.query_string
    if query:
        query = strip_query_param(query, key_query_param)
    target = destination.base_path + path
    if query:
        target = f"{target}?{query}"
    headers = upstream_header_lines(
        request.raw_headers,
        drop,
        destination.host,
        request.remote,
        request.scheme,
        request_id,
        request.authority,
    )
    if identity:
        headers += identity
    # loop.time() has millisecond steps under uvloop: too coarse for a loopback upstream.
    started = time.perf_counter()
    interim = request.connection.relay_interim
    if tunnel_idle is not None:
        # Hop-by-hop, so cleaned away above; asking the upstream to switch needs them. Only to
        # the WebSocket the route allows, whatever else the client's Upgrade names: offered
        # `websocket, h2c`, an upstream that speaks h2c switched to it, and the tunnel carried
        # HTTP/2 requests for any path, none of them routed, checked or metered.
        headers += _ASK_FOR_WEBSOCKET
        reply = await destination.client.send(
            request.method, target, headers, None, on_interim=interim, upgrade=b"websocket"
        )
        if reply.status == 101:
            if not _accepts_the_key(request, reply):
                # The client would fail the WebSocket at once (RFC 6455 4.1), and the tunnel be
                # logged and counted as a switch that carried nothing: a 502 saying why.
                reply.abort()
                raise MalformedResponse(
                    "it answered 101 without the Sec-WebSocket-Accept of the request's key"
                )
            upstream_seconds = time.perf_counter() - started
            if cost_reading is not None:
                # A 101 has no body, so no trailer: its head says it or nothing does.
                extra_response_headers, _ = cost_reading.at_head(reply, extra_response_headers)
            switched = switching_protocols_head(
                reply.reason, reply.raw_headers, extra_response_headers
            )
            tunnel = await switch_and_relay(request, switched, reply, tunnel_idle)
            return ForwardResult(
                101, upstream_seconds, tunnel.bytes_down, None, tunnel.bytes_up, tunnel.idle
            )
    elif request.body_exists:
        reply = await _send_with_body(request, destination, target, headers, body_timeout)
    else:
        reply = await destination.client.send(
            request.method, target, headers, None, on_interim=interim
        )
    upstream_seconds = time.perf_counter() - started
    if cost_reading is not None:
        extra_response_headers, reads_on = cost_reading.at_head(reply, extra_response_headers)
        if not reads_on:
            cost_reading = None  # the head said all there was to read
        elif isinstance(cost_reading, BodyCost) and cost_reading.reads_whole_first:
            # A small JSON body, sent whole already: read before the head leaves, so that
            # the head's quota headers count what it reports.
            extra_response_headers = await _read_before_head(
                reply, cost_reading, extra_response_headers, upstream_seconds, on_cut
            )
            cost_reading = None  # all it had to read, read
    head = client_response_head(reply.raw_headers, extra_response_headers)
    if head.keep_alive is not None:
        reply.keep_alive(head.keep_alive)
    # Most answers are complete by now: answered without another coroutine.
    whole = _answer_whole(request, reply, head, upstream_seconds, on_answered, cost_reading)
    if whole is not None:
        return whole
    return await _stream_body(
        request, destination.product, reply, head.block, head.content_length, request_id,
        body_timeout, upstream_seconds, on_answered, on_cut, cost_reading,
    )  # fmt: skip


async def _read_before_head(
    reply: HttpReply,
    cost_reading: BodyCost,
    extra: ExtraHeaders | None,
    upstream_seconds: float,
    on_cut: CutHook | None,
) -> ExtraHeaders | None:
    """Wait for the rest of a small body (under the upstream's timeout, as a relay would),
    then have `cost_reading` read it: the answer's header lines. A body that fails raises,
    and the client gets the 502 in the answer's place, since not a byte of it has left."""
    try:
        await reply.until_complete()
    except BaseException as exc:
        reply.abort()
        cost_reading.at_end(reply)  # cut short: nothing said
        if on_cut is not None and not isinstance(exc, ResponseBodyError):
            on_cut(upstream_seconds, 0, None)  # the client left (cancelled) meanwhile
        raise
    return cost_reading.at_whole(reply, extra)


async def _send_with_body(
    request: Request,
    destination: Destination,
    target: str,
    headers: Sequence[tuple[bytes, bytes]],
    body_timeout: float,
) -> HttpReply:
    body = _ClientBody(request, body_timeout)
    method = request.method
    # An idempotent request whose connection turns out stale is sent again (nginx does too):
    # so its body, when small, is kept until the answer comes.
    source = ReplayableBody(body) if method in IDEMPOTENT else body
    try:
        return await destination.client.send(
            method, target, headers, source, on_interim=request.connection.relay_interim
        )
    except RequestBodyFailed as exc:
        # The HTTP client only saw its body source fail; the client is the one to blame.
        failure = body.failure
        if failure is None:
            raise
        try:
            raise failure from exc
        finally:
            del failure  # this frame is in its traceback: no cycle through a local
    finally:
        # The failure's traceback holds the body's frames, which hold the body: kept, that
        # is a cycle only the cyclic collector frees (a reload freezes it for good).
        body.failure = None


def _answer_whole(
    request: Request,
    reply: HttpReply,
    head: ResponseHead,
    upstream_seconds: float,
    on_answered: AnswerHook | None,
    cost_reading: CostReading | None,
) -> ForwardResult | None:
    """Answer at once when the whole answer is in hand; None when its body must stream.
    `cost_reading`: what reads the answer's cost on from its head, told the body and end."""
    connection = request.connection
    status = reply.status
    length = head.content_length
    if request.method == "HEAD" or status in (204, 304) or length == 0:
        # The head is the whole answer (llhttp has seen to it that no body follows).
        if on_answered is not None:
            on_answered(status, upstream_seconds, 0)
        block = head.block
        if status == 204 and length is not None:
            block = without_length(block)
        connection.begin_answer(request, status, reply.reason, block)
        try:
            connection.end_answer()
        finally:
            if reply.done:
                reply.take_body()
                reply.finish()
            else:
                reply.abort()
            if cost_reading is not None:  # a head without a body: nothing more said
                cost_reading.at_end(reply)
        return ForwardResult(status, upstream_seconds, 0)
    if not reply.done:
        return None
    # All of it is in hand: head and body leave in one write, framed by a length.
    body = reply.take_body()
    reply.finish()
    block = head.block
    if length is None:
        block += b"Content-Length: %d\r\n" % len(body)
    if on_answered is not None:
        on_answered(status, upstream_seconds, len(body))
    try:
        connection.begin_answer(request, status, reply.reason, block)
        connection.end_answer(body)
    finally:
        if cost_reading is not None:
            # Once the answer has left: reading a body for its cost never holds it up.
            cost_reading.feed(body)
            cost_reading.at_end(reply)
    return ForwardResult(status, upstream_seconds, len(body))


async def _stream_body(
    request: Request,
    product: Product,
    reply: HttpReply,
    block: bytes,
    length: int | None,
    request_id: str,
    body_timeout: float,
    upstream_seconds: float,
    on_answered: AnswerHook | None,
    on_cut: CutHook | None,
    cost_reading: CostReading | None,
) -> ForwardResult:
    """An answer whose body is still arriving: relayed chunk by chunk as it comes.
    `cost_reading`: what reads the answer's cost on from its head, told each chunk and the end."""
    connection = request.connection
    status = reply.status
    sent = 0
    error: str | None = None
    failure: ResponseBodyError | None = None
    completed = False

    def answering(body_bytes: int) -> None:
        nonlocal on_answered
        if on_answered is not None:
            on_answered(status, upstream_seconds, body_bytes)
            on_answered = None

    # Without a length the body is re-framed in chunks (or, for HTTP/1.0, by the close).
    chunked = length is None
    connection.begin_answer(
        request, status, reply.reason, block, chunked=chunked, close_delimited=chunked
    )
    try:
        try:
            while chunk := await reply.read():
                if reply.at_eof:
                    # The last chunk leaves with the end of the answer, in one write.
                    answering(sent + len(chunk))
                    connection.end_answer(chunk)
                    completed = True
                else:
                    if length is not None and sent + len(chunk) >= length:
                        answering(sent + len(chunk))
                    # Bounded: a client that stops reading would otherwise pin an upstream
                    # connection for ever.
                    await connection.write_body(chunk, body_timeout)
                if cost_reading is not None:
                    cost_reading.feed(chunk)  # once it has left: never holding it up
                sent += len(chunk)
        except ResponseBodyError as exc:
            error = f"The upstream of {product.name} {exc}"
            failure = exc
        except SendTimeout:
            error = f"The client stopped reading the answer for more than {body_timeout:g}s."
        if error is None and not completed:
            answering(sent)  # a chunked answer ends with the terminator
            connection.end_answer()
            completed = True
    except BaseException:
        # The client went away (cancelled, or noticed in a write) before the answer was done.
        if on_cut is not None and not completed:
            on_cut(upstream_seconds, sent, status if connection.answer_started else None)
        raise
    finally:
        if completed:
            reply.finish()
        else:
            reply.abort()
        if cost_reading is not None:
            # Told before the request settles, whether the body came whole or not (a body
            # cut short has no trailer, nor its last event: the report is missing).
            cost_reading.at_end(reply)
    if failure is not None and not connection.answer_started:
        # Not a byte of the answer left (its head waits for the first body bytes): the client
        # can still be told, with a 502 in its place, instead of a closed connection.
        raise failure
    if error is not None:
        # Sending the chunked terminator (or nothing more under a Content-Length) would
        # make a cut answer look complete; an abort makes the client see the truncation.
        connection.abort()
        # The id in the text: the log's format has no field for `extra`.
        log.warning(
            "answer cut short after %d body bytes: %s (request %s)", sent, error, request_id
        )
    return ForwardResult(status, upstream_seconds, sent, error)
