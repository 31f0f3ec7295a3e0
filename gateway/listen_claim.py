"""A gateway's claim on its listen addresses, from before it checks them until it drains.

`server.taken_address` refuses to start a gateway on ports something listens on, but two
gateways started together both pass that check before either binds (their workers bind with
SO_REUSEPORT once the keys are read, seconds later with many keys), and then share the ports,
each answering part of the traffic with its own config. The claim closes that window: a name
in Linux's abstract namespace of Unix sockets per address, which only one socket can hold and
which, like a port, belongs to the network namespace. It is given up when the drain begins:
from then on the port check speaks for the addresses (the admin port stays open until the
process exits). Where the abstract namespace does not exist (not Linux), the port check alone
remains.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable

from gateway.config.model import Address

# The claims this process holds (the supervisor's, or a single-process gateway's).
_held: list[socket.socket] = []


def claim(addresses: Iterable[tuple[str, Address]]) -> str | None:
    """Claim each (config path, address); why not, when another gateway holds one."""
    for name, address in addresses:
        if address.port == 0:
            continue  # any free port: nothing to collide with
        label = f"\0gateway-listen {address.host.lower()} {address.port}"
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            continue  # no Unix sockets here: the port check alone
        try:
            sock.bind(label)
            sock.listen(1)  # so that a gateway that finds it taken can ask who holds it
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                continue  # no abstract namespace here
            holder = _holder(label)
            if holder is None:
                continue  # not a gateway's claim (a name any user can bind): the port decides
            return (
                f"{name}: cannot listen on {address}: Address already in use "
                f"(gateway pid {holder} is starting or serving there)"
            )
        _held.append(sock)
    return None


def _holder(label: str) -> int | None:
    """The pid of the process holding the claim `label`, when it is this user's or root's:
    abstract names have no permissions, and another user's must not keep a gateway out of a
    port that user could not take."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(label)
            credentials = probe.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
        except OSError:
            return None
    pid, uid, _gid = struct.unpack("3i", credentials)
    return pid if uid in (0, os.getuid()) else None


def release() -> None:
    """Give the claims up: a drain begins, or, in a forked worker, the copies it inherited go
    (its supervisor holds the claims, and gives them up when it drains)."""
    while _held:
        _held.pop().close()
