"""Loopback ports: free ones, refused ones, and ones that hang on purpose."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress


def free_port(also_free: int = 0) -> int:
    """A loopback port that is free now; `also_free` asks that port+also_free be free too
    (a cluster node also listens on its bus port, port + 10000)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if not also_free:
            return port
        if port + also_free < 65536 and _bindable(port + also_free):
            return port
    raise RuntimeError("no free port pair found")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def closed_port() -> int:
    """A loopback port nothing listens on, so connecting to it is refused at once (a free
    port: another process could take it, but nothing in these tests binds ports it did not
    pick itself)."""
    return free_port()


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


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports
