"""Bytes both ways between a client and an upstream after a protocol switch (WebSocket).

After `101 Switching Protocols` the two connections stop speaking HTTP: each keeps its asyncio
protocol (the server connection on the client side, the upstream connection on the other), and
hands every event to its `TunnelEnd`. What one end receives is written to the other's transport
as it came, never queued here. Flow control is the transports' own: when the transport towards
one peer has more buffered than its high-water mark (the peer reads slowly), reading from the
other peer pauses until it drains, so a slow reader holds back the fast writer instead of making
the gateway buffer without bound.

The tunnel ends when either side closes (or sends EOF), or when no byte has moved either way for
`idle_timeout` seconds; both connections are then closed, what is buffered still delivered for a
moment (`CLOSE_GRACE`), then cut. `done` completes once both connections are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.http.reply import HttpReply
    from gateway.http.request import Request

__all__ = ["CLOSE_GRACE", "Tunnel", "TunnelEnd", "TunnelResult", "switch_and_relay"]

# How long closing connections may take to deliver what is still buffered for them.
CLOSE_GRACE = 5.0


@dataclass(slots=True)
class TunnelResult:
    bytes_up: int  # from the client to the upstream
    bytes_down: int  # from the upstream to the client
    idle: bool  # ended by the idle timeout rather than by a side closing


class TunnelEnd:
    """One side of a tunnel, as its protocol sees it: the protocol calls these on its events."""

    __slots__ = ("_tunnel", "lost", "peer", "received_bytes", "transport")

    def __init__(self, tunnel: Tunnel) -> None:
        # None once the tunnel is done (`Tunnel.check_done`): tunnel and ends would otherwise
        # hold each other, a cycle only the cyclic collector frees (see gateway/reload.py).
        self._tunnel: Tunnel | None = tunnel
        self.transport: asyncio.Transport | None = None
        self.peer: TunnelEnd | None = None
        self.received_bytes = 0
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.received_bytes += len(data)
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.last_activity = tunnel.loop.time()
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)

    def pause_writing(self) -> None:
        """This side's transport is full: stop reading what would only add to it."""
        peer = self.peer
        if peer is not None and peer.transport is not None:
            with contextlib.suppress(RuntimeError):
                peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer, tunnel = self.peer, self._tunnel
        if peer is not None and peer.transport is not None and tunnel and not tunnel.ending:
            with contextlib.suppress(RuntimeError):
                peer.transport.resume_reading()

    def eof_received(self) -> None:
        if self._tunnel is not None:
            self._tunnel.end()

    def connection_lost(self) -> None:
        self.lost = True
        self.transport = None
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.end()
            tunnel.check_done()

    def detach(self) -> None:
        """The tunnel is done: let go of it and of the other end."""
        self._tunnel = None
        self.peer = None


class Tunnel:
    """Two `TunnelEnd`s joined; `start` once both transports are attached."""

    def __init__(self, idle_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = TunnelEnd(self)
        self.upstream = TunnelEnd(self)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self._idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self.last_activity = self.loop.time()
        self.ending = False
        self._idle = False
        self.done: asyncio.Future[TunnelResult] = self.loop.create_future()

    def start(self, client_pending: bytes, upstream_pending: bytes) -> None:
        """Start relaying once both ends have their transport (each connection's switch sets
        it, paused); the pending bytes are what each side sent right after the switch, read
        before the tunnel existed."""
        if self.client.lost or self.upstream.lost:
            # One side left during the switch: nothing to relay, and nothing to wait for.
            self.ending = True
            for end in (self.client, self.upstream):
                if end.transport is not None:
                    end.transport.abort()
            self.check_done()
            return
        if client_pending:
            self.client.data_received(client_pending)
        if upstream_pending:
            self.upstream.data_received(upstream_pending)
        self.last_activity = self.loop.time()
        self._idle_timer = self.loop.call_later(self._idle_timeout, self._check_idle)
        for end in (self.client, self.upstream):
            if end.transport is not None:
                with contextlib.suppress(RuntimeError):
                    end.transport.resume_reading()

    def _check_idle(self) -> None:
        if self.ending:
            return
        due = self.last_activity + self._idle_timeout
        if due > self.loop.time() + 0.001:  # the loop's clock has millisecond steps
            # One timer moved once per period rather than once per chunk.
            self._idle_timer = self.loop.call_at(due, self._check_idle)
            return
        self._idle_timer = None
        self._idle = True
        self.end()

    def end(self) -> None:
        """Close both sides (once); what is buffered for them has CLOSE_GRACE to leave."""
        if self.ending:
            self.check_done()
            return
        self.ending = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for end in (self.client, self.upstream):
            if end.transport is not None:
                end.transport.close()
        self._grace_timer = self.loop.call_later(CLOSE_GRACE, self.abort)
        self.check_done()

    def abort(self) -> None:
        self.ending = True
        for end in (self.client, self.upstream):
            if end.transport is not None:
                end.transport.abort()

    def check_done(self) -> None:
        if self.client.lost and self.upstream.lost and not self.done.done():
            if self._grace_timer is not None:
                self._grace_timer.cancel()
                self._grace_timer = None
            result = TunnelResult(
                self.client.received_bytes, self.upstream.received_bytes, self._idle
            )
            self.done.set_result(result)
            self.client.detach()
            self.upstream.detach()


async def switch_and_relay(
    request: Request, head: bytes, reply: HttpReply, idle_timeout: float
) -> TunnelResult:
    """After the upstream's 101 to an upgrade `request`: send the client `head` (the 101 as it
    should see it), join both connections in a tunnel, and return once it has ended."""
    tunnel = Tunnel(idle_timeout)
    client_pending = request.connection.switch_protocols(request, head, tunnel.client)
    upstream_pending = reply.switch_protocols(tunnel.upstream)
    tunnel.start(client_pending, upstream_pending)
    try:
        return await asyncio.shield(tunnel.done)
    except asyncio.CancelledError:
        tunnel.abort()
        raise
