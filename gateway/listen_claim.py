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

from gateway.config.addresses import WILDCARD_HOSTS, host_spellings
from gateway.config.model import Address

# The claims this process holds (the supervisor's, or a single-process gateway's).
_held: list[socket.socket] = []
# Connections of gateways asking who holds a claim, queued before the next is refused.
_ASKING_QUEUE = 16


def claim(addresses: Iterable[tuple[str, Address]]) -> str | None:
    """Claim each (config path, address); why not, when another gateway holds one.

    An address is claimed under every spelling of its host (`localhost` is `127.0.0.1` and
    `::1`, `127.1` is `127.0.0.1`), and every wildcard host (`0.0.0.0`, `::`) under one name,
    since each of those pairs would share a port through SO_REUSEPORT. A wildcard and a host
    of its own on one port are not told apart until one of them listens (the port check)."""
    for name, address in addresses:
        if address.port == 0:
            continue  # any free port: nothing to collide with
        hosts = host_spellings(address.host)
        if not WILDCARD_HOSTS.isdisjoint(hosts):
            hosts = {"*"}
        for host in sorted(hosts):
            holder = _claim(f"\0gateway-listen {host} {address.port}")
            if holder is not None:
                # 0: a gateway whose pid cannot be told (another pid namespace, or its queue
                # of such questions full).
                who = f"gateway pid {holder}" if holder > 0 else "another gateway"
                return (
                    f"{name}: cannot listen on {address}: Address already in use "
                    f"({who} is starting or serving there)"
                )
    return None


def _claim(label: str) -> int | None:
    """Hold the abstract name `label`, or say which gateway holds it (None: held now, or not
    a gateway's to hold, or no such namespace here: the port check decides)."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return None  # no Unix sockets here: the port check alone
    try:
        sock.bind(label)
        # So that a gateway that finds it taken can ask who holds it. Nothing accepts: each
        # asking connection stays queued, and once the queue is full the next is told so.
        sock.listen(_ASKING_QUEUE)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            return None  # no abstract namespace here
        # None: not a gateway's claim (a name any user can bind): the port decides.
        return _holder(label)
    _held.append(sock)
    return None


def _holder(label: str) -> int | None:
    """The pid of the process holding the claim `label`, when it is this user's or root's:
    abstract names have no permissions, and another user's must not keep a gateway out of a
    port that user could not take."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        # Not blocking: a connect to a full queue waits until the holder accepts, which it
        # never does (a third gateway started on a busy port hung there for good).
        probe.setblocking(False)
        try:
            probe.connect(label)
            credentials = probe.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
        except BlockingIOError:
            return 0  # held, by a gateway asked so often its queue is full: pid unknown
        except OSError:
            return None
    pid, uid, _gid = struct.unpack("3i", credentials)
    return pid if uid in (0, os.getuid()) else None


def release() -> None:
    """Give the claims up: a drain begins, or, in a forked worker, the copies it inherited go
    (its supervisor holds the claims, and gives them up when it drains)."""
    while _held:
        _held.pop().close()
