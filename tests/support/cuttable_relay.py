"""A loopback TCP relay that can cut one client off from its server, as a network partition
does, while other clients reach the server directly.

`cut(silent=True)` stops passing bytes either way but keeps every connection open (packets
dropped: nobody is told), and new connections are taken and left hanging the same way;
`cut(silent=False)` closes every connection and refuses new ones (a reset). `mend()` relays
again; the connections of a silent cut stay dead, as after a real partition: their client
must notice and reconnect. Threads with blocking sockets; `close` ends them all.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from contextlib import suppress
from types import TracebackType


class CuttableRelay:
    """Listens on `port` (127.0.0.1) and relays each connection to `target_port`."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._mode = "open"  # or "silent", "refusing"
        self._pairs: list[tuple[socket.socket, socket.socket | None]] = []
        self._dead: set[int] = set()  # ids of client sockets cut off for good
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def cut(self, *, silent: bool) -> None:
        with self._lock:
            self._mode = "silent" if silent else "refusing"
            pairs = list(self._pairs)
            self._dead.update(id(client) for client, _ in pairs)
        if not silent:
            for client, server in pairs:
                _close(client)
                if server is not None:
                    _close(server)

    def mend(self) -> None:
        with self._lock:
            self._mode = "open"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                mode = self._mode
            if mode == "refusing":
                _close(client)
                continue
            server: socket.socket | None = None
            if mode == "open":
                try:
                    server = socket.create_connection(("127.0.0.1", self._target_port), timeout=5)
                    server.settimeout(None)
                except OSError:
                    _close(client)
                    continue
            with self._lock:
                self._pairs.append((client, server))
                if mode != "open":
                    self._dead.add(id(client))
            if server is None:
                self._start(self._swallow, client)
            else:
                self._start(self._pass, client, server, client)
                self._start(self._pass, server, client, client)

    def _start(self, target: Callable[..., None], *args: socket.socket) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _swallow(self, client: socket.socket) -> None:
        """A connection made during a silent cut: read and dropped until closed."""
        with suppress(OSError):
            while client.recv(65536):
                pass

    def _pass(self, source: socket.socket, sink: socket.socket, client: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                with self._lock:
                    dead = id(client) in self._dead
                if not dead:
                    sink.sendall(data)
        _close(sink)

    def close(self) -> None:
        _close(self._listener)
        with self._lock:
            pairs, threads = list(self._pairs), list(self._threads)
        for client, server in pairs:
            _close(client)
            if server is not None:
                _close(server)
        self._acceptor.join(5)
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> CuttableRelay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _close(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with suppress(OSError):
        sock.close()
