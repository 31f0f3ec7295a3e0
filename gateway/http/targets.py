"""What a request's Host and target may be on the proxy port (RFC 9112 3.2, RFC 3986 3.2.2).

A request the gateway would read one way and an upstream another is refused with a 400
before any handler sees it: a Host that is not a host and port, and a target that is neither a
path, an http(s) URL, nor `OPTIONS *`. CONNECT is refused whatever its target: the gateway is
a reverse proxy, never a tunnel to a host the client names.
"""

from __future__ import annotations

import re

# host [":" port]: a name or an IPv4 address, or an IPv6 literal in brackets (with a zone as
# %25...). A name's characters are RFC 3986's reg-name's but for ',' and ';', which separate
# values in the forwarding headers the host is copied into (X-Forwarded-Host, Forwarded): an
# upstream would read `a.example,b.example` as two hosts.
_HOST = re.compile(
    rb"(?:[A-Za-z0-9\-._~!$&'()*+=%]*|\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9\-._~%]+)?\])"
    rb"(?::([0-9]{0,5}))?"
)

NOT_A_HOST = "its Host header is not a host (and port)"
CONNECT_REFUSED = "CONNECT is not served here (the gateway is a reverse proxy, not a tunnel)"


def is_host(value: bytes) -> bool:
    """Whether `value` is a host and an optional port (at most 65535), as Host carries it; an
    empty value is one (RFC 9112 3.2: a target without an authority)."""
    found = _HOST.fullmatch(value)
    if found is None:
        return False
    port = found[1]
    return not port or int(port) <= 65535


def target_refusal(method: bytes, target: bytes) -> str | None:
    """Why a request with this method and a target that is not a path is refused, or None."""
    if method == b"CONNECT":
        return CONNECT_REFUSED
    if target == b"*":
        return None if method == b"OPTIONS" else "only OPTIONS may have the target '*'"
    scheme, separator, rest = target.partition(b"://")
    if not separator or scheme.lower() not in (b"http", b"https"):
        return "its target is neither a path nor an http(s) URL"
    authority = rest.split(b"/", 1)[0].split(b"?", 1)[0]
    if not authority or not is_host(authority):
        return "its target's host is not a host (and port)"
    return None
