"""Sockets that misbehave on purpose, all on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress


@contextmanager
def unaccepting_port() -> Iterator[int]:
    """A port where connecting hangs: a listen(0) socket nobody accepts on, its queue filled,
    so Linux drops further SYNs. A connect timeout without leaving loopback."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            with suppress(BlockingIOError):
                filler.connect(listener.getsockname())
        yield int(listener.getsockname()[1])
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
