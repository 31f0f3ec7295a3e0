"""A loopback relay in front of a TLS 1.2 server that never lets a client's TLS close through.

Everything is passed on both ways until the client sends a TLS alert (its close_notify, when it
closes the connection): that record and whatever follows it are kept from the server, so the
server never answers the close, as a server that stopped reading would not. The client's
close then waits for an answer that never comes, while every other exchange works as usual.

TLS 1.2 only: there an alert's record says it is one (TLS 1.3 hides the type of every record
after the handshake). Threads with blocking sockets; `close` ends them all.

`wait_for_reply` waits for the server's next bytes to a client: a test that wants to act
between two of a client's periodic calls acts right after one was answered.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from contextlib import suppress
from types import TracebackType

_ALERT = 21  # the TLS record type of an alert (RFC 5246, 6.2.1)
_HEADER = 5  # type (1), version (2), length (2)


class CloseHoldingRelay:
    """Listens on `port` (127.0.0.1) and relays each connection to `target_port`;
    `held` counts the connections whose close it has kept from the server."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.held = 0
        self._lock = threading.Lock()
        self._replies = 0  # chunks passed from a server to its client
        self._replied = threading.Condition(self._lock)
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []  # the relaying ones
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _start(
        self, target: Callable[[socket.socket, socket.socket], None], *args: socket.socket
    ) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self._target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            self._start(self._to_server, client, server)
            self._start(self._to_client, server, client)

    def _to_server(self, client: socket.socket, server: socket.socket) -> None:
        with suppress(OSError):
            while (header := _read_exactly(client, _HEADER)) is not None:
                body = _read_exactly(client, int.from_bytes(header[3:5], "big"))
                if body is None:
                    return
                if header[0] == _ALERT:
                    with self._lock:
                        self.held += 1
                    return  # nothing more reaches the server; the sockets stay open
                server.sendall(header + body)

    def _to_client(self, server: socket.socket, client: socket.socket) -> None:
        with suppress(OSError):
            while chunk := server.recv(65536):
                client.sendall(chunk)
                with self._replied:
                    self._replies += 1
                    self._replied.notify_all()

    def wait_for_reply(self, timeout: float) -> None:
        """Until a server has sent its client something after this call began."""
        with self._replied:
            seen = self._replies
            if not self._replied.wait_for(lambda: self._replies > seen, timeout):
                raise AssertionError(f"no reply through the relay within {timeout}s")

    def close(self) -> None:
        # shutdown, not only close: it wakes a thread blocked in accept or recv on the socket.
        # The acceptor first, so that no connection comes after the others are closed.
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(5)
        with self._lock:
            sockets, self._sockets = self._sockets, []
            threads, self._threads = self._threads, []
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> CloseHoldingRelay:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    """`size` bytes, or None at the end of the stream."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
