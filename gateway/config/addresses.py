"""Listen addresses in the config: `host:port` parsed, and which hosts one address stands
for (loopback, wildcard, the spellings of one host), known without asking a resolver."""

from __future__ import annotations

import ipaddress
import re
import socket

from gateway.config.model import Address

_ADDRESS = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>[0-9]+)")
ADDRESS_HINT = "must be host:port or [ipv6]:port"

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})

# A host that can only mean an IPv4 address, right or wrong (`256.1.1.1`).
_DOTTED_DIGITS = re.compile(r"[0-9]+(\.[0-9]+){3}")


def parse_address(text: str) -> Address:
    """`host:port` or `[ipv6]:port`; `ValueError` with a message otherwise."""
    match = _ADDRESS.fullmatch(text.strip())
    if match is None:
        raise ValueError(ADDRESS_HINT)
    port = int(match["port"])
    if port > 65535:
        raise ValueError("port must be between 0 and 65535")
    if match["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(match["ipv6"])
        except ValueError:
            raise ValueError(f"{match['ipv6']!r} is not an IPv6 address") from None
        return Address(match["ipv6"], port)
    host = match["host"]
    if _DOTTED_DIGITS.fullmatch(host) is not None:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
    return Address(host, port)


def is_loopback(host: str) -> bool:
    """Whether every address `host` stands for is a loopback one (a name other than
    `localhost` is not known to be)."""
    for spelled in host_spellings(host):
        try:
            if not ipaddress.ip_address(spelled).is_loopback:
                return False
        except ValueError:
            return False
    return True


def listens_clash(a: Address, b: Address) -> bool:
    """Whether two listen addresses could be one socket's: the same port on the same host,
    however spelled (`localhost`, `127.0.0.1`; `::1`, `0:0:0:0:0:0:0:1`), or on every host."""
    if a.port != b.port or a.port == 0:
        return False
    ours, theirs = host_spellings(a.host), host_spellings(b.host)
    return not ours.isdisjoint(theirs) or not WILDCARD_HOSTS.isdisjoint(ours | theirs)


def host_spellings(host: str) -> set[str]:
    """The addresses `host` stands for, as far as they are known without asking a resolver:
    `localhost` (with its root dot, in any case), IPv4 shorthands (`127.1`), IPv4 mapped into
    IPv6 (`::ffff:127.0.0.1`)."""
    name = host.lower().rstrip(".")
    if name == "localhost":
        return {"127.0.0.1", "::1"}
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        try:
            return {socket.inet_ntoa(socket.inet_aton(name))}  # what the system would bind
        except OSError:
            return {name}
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return {str(address.ipv4_mapped)}
    return {str(address)}
