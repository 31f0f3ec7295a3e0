"""What a request head may be on the proxy port (RFC 9112 2-3, RFC 3986 3.2.2), beyond what
the parser checks.

A request the gateway would read one way and an upstream another is refused with a 400
before any handler sees it: a version other than 1.1 and 1.0, a Transfer-Encoding on 1.0, a
fragment in the target, other than one Host (HTTP/1.0: at most one), a Host that is not a host
and port, and a target that is neither a path, an http(s) URL, nor `OPTIONS *`. CONNECT is
refused whatever its target: the gateway is a reverse proxy, never a tunnel to a host the client
names. (The framing headers are checked as they are parsed: `gateway.http.parsing`.)
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
TRANSFER_ENCODING_ON_1_0 = "an HTTP/1.0 request may not have a Transfer-Encoding"
CONNECT_REFUSED = "CONNECT is not served here (the gateway is a reverse proxy, not a tunnel)"


# Hosts judged lately: a gateway's clients send the same few Host values again and again, and a
# dict lookup costs a tenth of the regular expression (1.1 us, bench/PROFILE.md, "Session 13").
# Bounded: dropped whole when full, which costs a stream of made-up hosts nothing but inserts.
_judged: dict[bytes, bool] = {}
_MAX_JUDGED = 256


def is_host(value: bytes) -> bool:
    """Whether `value` is a host and an optional port (at most 65535), as Host carries it; an
    empty value is one (RFC 9112 3.2: a target without an authority), a port without a host is
    not (RFC 9110 4.2.1)."""
    judged = _judged.get(value)
    if judged is not None:
        return judged
    found = _HOST.fullmatch(value)
    judged = (
        found is not None
        and not value.startswith(b":")
        and (not found[1] or int(found[1]) <= 65535)
    )
    if len(_judged) >= _MAX_JUDGED:
        _judged.clear()
    _judged[value] = judged
    return judged


def head_refusal(
    version: str, method: bytes, target: bytes, hosts: int, chunked: bool
) -> str | None:
    """Why a complete head (its version, method, target, count of Host lines, and whether it
    has a Transfer-Encoding) is refused, or None: the checks beyond each header line's own, in
    one call per request."""
    if version != "1.1":
        if version != "1.0":
            # llhttp reads `GET /path` as HTTP/0.9 and takes HTTP/2.0 in a request line; this
            # server speaks neither, and an upstream would be told HTTP/1.1 either way.
            return f"HTTP/{version} is not spoken here (HTTP/1.1 or 1.0)"
        if chunked:
            # HTTP/1.0 has no Transfer-Encoding: a proxy in front that knows only 1.0 framing
            # reads no body there, and the chunks as the next request, which the gateway would
            # never have seen, checked or metered. RFC 9112 6.1 calls the framing faulty;
            # nginx answers 400 too.
            return TRANSFER_ENCODING_ON_1_0
    if b"#" in target:
        # No request-target has a fragment (RFC 9112 3.2). Routing would read it as part of
        # the path (`/old#` matching `/{rest:path}`, not a retired `/old`) where an upstream
        # drops it, so the two would read different paths.
        return "its target holds a '#' (a fragment is never sent to a server)"
    if hosts != 1 and (hosts or version == "1.1"):
        # RFC 9112 3.2: exactly one Host in HTTP/1.1, at most one before; which of two hosts a
        # request is for is a question the upstream might answer differently.
        return "it must have exactly one Host header"
    if method == b"CONNECT" or target[:1] != b"/":
        return target_refusal(method, target)
    return None


def split_authority(rest: bytes) -> tuple[bytes, bytes]:
    """What follows `scheme://` in an absolute-form target, as its authority (up to the first
    `/` or `?`) and the path and query after it: judged here, routed by `Request` alike."""
    end = len(rest)
    for mark in (b"/", b"?"):
        found = rest.find(mark)
        if 0 <= found < end:
            end = found
    return rest[:end], rest[end:]


def target_refusal(method: bytes, target: bytes) -> str | None:
    """Why a request with this method and a target that is not a path is refused, or None."""
    if method == b"CONNECT":
        return CONNECT_REFUSED
    if target == b"*":
        return None if method == b"OPTIONS" else "only OPTIONS may have the target '*'"
    scheme, separator, rest = target.partition(b"://")
    if not separator or scheme.lower() not in (b"http", b"https"):
        return "its target is neither a path nor an http(s) URL"
    authority, _ = split_authority(rest)
    if not authority or not is_host(authority):
        return "its target's host is not a host (and port)"
    return None
