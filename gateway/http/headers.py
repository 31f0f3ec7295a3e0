"""Header and query hygiene between a client and an upstream, RFC 9110's rules for a proxy.

Pure functions over header lines: repeated headers are kept line by line in order
(`Set-Cookie`, `Cache-Control`, ...), never folded into a plain dict. The hot path works on the
raw byte lines the parsers produced and hands bytes on, decoding nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import NamedTuple
from urllib.parse import unquote_plus

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.http.wire import date_line, encode_header_block, status_line

# RFC 9110 §7.6.1 plus the proxy headers that only make sense for one hop. Expect is
# answered by the gateway itself (100 Continue), so it must not make the upstream wait too.
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "expect",
    }
)

# A `Connection: content-length` line would make us drop the message framing, which is how
# request smuggling starts; these are never removed because the Connection header names them.
_NEVER_CONNECTION_LISTED: frozenset[str] = frozenset({"content-length", "content-type", "host"})


# Request headers a proxy sets itself, whatever the client sent.
SET_BY_PROXY: frozenset[str] = frozenset(
    {
        "host",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        # who called, for upstreams that ask (`upstream.identity_headers`); never the client's
        "x-gateway-key-name",
        "x-gateway-plan",
    }
)
_GATEWAY_OWNED: frozenset[bytes] = frozenset(name.encode() for name in SET_BY_PROXY)
# What upstream frameworks read as a proxy's view of the request (the client's address, the
# scheme, port and path prefix it came in on: Rack takes `X-Forwarded-Ssl: on` for https over
# X-Forwarded-Proto, Spring and ASP.NET take a prefix) or as the URL to serve in place of the
# request's own (IIS' and old Symfony's X-Original-URL): a client that sends them would choose
# what the gateway states or serve a path the routes never saw. So are the method overrides
# (Express's method-override, Laravel, Symfony, ASP.NET Core and OData read them, most on a
# POST): `POST /docs/7` with `X-HTTP-Method-Override: DELETE` is a DELETE upstream, though the
# route allowed only GET and POST there. Dropped, never replaced.
CLIENT_MAY_NOT_CLAIM: frozenset[str] = frozenset(
    {
        "x-real-ip",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-path",
        "x-forwarded-server",
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    }
)
_REQUEST_DROP: frozenset[bytes] = (
    frozenset(name.encode() for name in HOP_BY_HOP | CLIENT_MAY_NOT_CLAIM) | _GATEWAY_OWNED
)
_NEVER_CONNECTION_LISTED_RAW: frozenset[bytes] = frozenset(
    name.encode() for name in _NEVER_CONNECTION_LISTED
)

RawHeaderLines = Iterable[tuple[bytes, bytes]]


def request_drop_set(key_header: str) -> frozenset[bytes]:
    """The lower-cased names `upstream_header_lines` drops for this auth config; build once."""
    return _REQUEST_DROP | {key_header.lower().encode("latin-1")}


def upstream_header_lines(
    client_headers: RawHeaderLines,
    drop: frozenset[bytes],
    upstream_host: bytes,
    client_ip: str | None,
    client_proto: str,
    request_id: str,
    target_host: bytes | None = None,
) -> list[tuple[bytes, bytes]]:
    """The header lines to send upstream, as bytes: the client's raw lines, cleaned.

    Hop-by-hop headers, those in CLIENT_MAY_NOT_CLAIM and the API key header (`drop`, from
    `request_drop_set`) go; Host becomes the upstream's; X-Forwarded-For and Forwarded (RFC
    7239) get the peer appended, Forwarded with the host and protocol too; X-Forwarded-Proto,
    X-Forwarded-Host and X-Request-ID are the gateway's own view, whatever the client claimed.
    X-Forwarded-Host is the client's Host, or `target_host` (the host an absolute-form target
    names) when given, since that one wins (RFC 9112 3.2.2). A client's X-Forwarded-For or
    Forwarded that its Connection header names is hop-by-hop, and goes like any other.
    The client's lines are passed on as they came, so nothing is decoded or re-encoded.
    """
    kept: list[tuple[bytes, bytes]] = []
    client_host: bytes | None = None
    forwarded_for: list[bytes] = []
    forwarded: list[bytes] = []  # the client's Forwarded lines (rare)
    listed: set[bytes] | None = None
    for line in client_headers:
        name = line[0].lower()
        if name not in drop:
            kept.append(line)
        elif name == b"host":
            if client_host is None:
                client_host = line[1]
        elif name == b"x-forwarded-for":
            forwarded_for.append(line[1])
        elif name == b"forwarded":
            forwarded.append(line[1])
        elif name == b"connection":
            listed = _connection_listed_raw(line[1], listed)
    if listed:
        kept = [line for line in kept if line[0].lower() not in listed]
        if b"x-forwarded-for" in listed:
            forwarded_for = []
        if b"forwarded" in listed:
            forwarded = []
    kept.append((b"Host", upstream_host))
    proto = client_proto.encode("ascii")
    if target_host is not None:
        client_host = target_host
    if client_ip:
        forwarded_for.append(client_ip.encode("ascii"))
    # The same few (peer, host, protocol) come again and again: the element is remembered.
    element = _FORWARDED.get((client_ip, client_host, client_proto))
    if element is None:
        element = _forwarded_element(client_ip, client_host, client_proto)
    if forwarded:
        forwarded.append(element)
        element = b", ".join(forwarded)
    if forwarded_for:
        kept.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
    kept.append((b"Forwarded", element))
    kept.append((b"X-Forwarded-Proto", proto))
    if client_host:  # an empty Host names no host: none is stated (nor in Forwarded)
        kept.append((b"X-Forwarded-Host", client_host))
    kept.append((b"X-Request-ID", request_id.encode("ascii")))
    return kept


# Forwarded elements made lately, by (peer, host, protocol); dropped whole when full, so a
# stream of made-up hosts costs only the making. Built anew, the element cost ~1.4 µs a
# request (bench/PROFILE.md, "Session 13").
_FORWARDED: dict[tuple[str | None, bytes | None, str], bytes] = {}
_MAX_FORWARDED = 256


def _forwarded_element(
    client_ip: str | None, client_host: bytes | None, client_proto: str
) -> bytes:
    """The gateway's element of Forwarded (RFC 7239), remembered in _FORWARDED."""
    if client_ip:
        peer = client_ip.encode("ascii")
        # RFC 7239 6: an IPv6 address is bracketed and quoted; a host with a port is quoted.
        node = b'"[%b]"' % peer if b":" in peer else peer
    else:
        node = b"unknown"
    proto = client_proto.encode("ascii")
    element = (
        b'for=%b;host="%b";proto=%b' % (node, client_host, proto)
        if client_host
        else b"for=%b;proto=%b" % (node, proto)
    )
    if len(_FORWARDED) >= _MAX_FORWARDED:
        _FORWARDED.clear()
    _FORWARDED[client_ip, client_host, client_proto] = element
    return element


def decode(raw: bytes) -> str:
    """Header bytes as text, as aiohttp's parser decodes them: undecodable bytes survive."""
    return raw.decode("utf-8", "surrogateescape")


def decoded_lines(raw_lines: RawHeaderLines) -> CIMultiDictProxy[str]:
    """Raw header lines as a (read-only) multidict, for what wants names and values as text."""
    return CIMultiDictProxy(CIMultiDict((decode(name), decode(value)) for name, value in raw_lines))


class ResponseHead(NamedTuple):
    """The header block for the client, and what framing the body needs."""

    block: bytes  # "Name: value\r\n" lines: the upstream's cleaned, then the gateway's
    content_length: int | None  # the upstream's, None when it sent none (or chunked)
    # The upstream's Keep-Alive value (its lines joined), None without one: hop-by-hop, never
    # sent on, but its `timeout=N` is the connection pool's business (HttpReply.keep_alive).
    keep_alive: bytes | None


# What `client_response_head` does with a line, by its lower-cased name; any other is kept.
_DROP, _TRANSFER_ENCODING, _CONNECTION, _LENGTH, _DATE, _KEEP_ALIVE = range(6)
_LINE_ACTIONS: dict[bytes, int] = {name.encode(): _DROP for name in HOP_BY_HOP} | {
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"keep-alive": _KEEP_ALIVE,
    b"content-length": _LENGTH,
    b"date": _DATE,
}
# Per set of the gateway's own header names (a few fixed sets): those names dropped too.
_ACTIONS_BY_EXTRA: dict[tuple[str, ...], dict[bytes, int]] = {}


class ExtraHeaders(NamedTuple):
    """Header lines of the gateway's own for an answer (X-Request-ID, the limit headers): their
    names, which replace any upstream line of the same name, and the lines, encoded. Built by
    the caller, which may render them more cheaply than line by line from a dict."""

    names: tuple[str, ...]
    block: bytes  # "Name: value\r\n" lines


def extra_headers(headers: Mapping[str, str]) -> ExtraHeaders:
    return ExtraHeaders(tuple(headers), encode_header_block(headers))


def _line_actions(key: tuple[str, ...]) -> dict[bytes, int]:
    actions = _ACTIONS_BY_EXTRA.get(key)
    if actions is None:
        replaced = {name.lower().encode("latin-1"): _DROP for name in key}
        actions = _LINE_ACTIONS | replaced
        if len(_ACTIONS_BY_EXTRA) < 256:
            _ACTIONS_BY_EXTRA[key] = actions
    return actions


def client_response_head(
    upstream_lines: RawHeaderLines, extra: ExtraHeaders | None = None
) -> ResponseHead:
    """The header lines to send the client for an upstream answer, as one block of bytes.

    Hop-by-hop lines (and those the Connection header names) go, repeated lines stay in
    order; `extra` (the gateway's X-Request-ID and rate-limit headers) replaces any line of
    the same name, since those describe the gateway's decision. A Date line is added when the
    upstream sent none (RFC 9110 §6.6.1). One dict lookup per line decides its fate: this
    runs for every proxied answer. The Keep-Alive value is noted on the way (for the pool:
    looked for anywhere else, it would cost every answer another look at each line).
    """
    actions = _line_actions(extra.names) if extra else _LINE_ACTIONS
    parts: list[bytes] = []
    length: bytes | None = None
    dated = False
    chunked = False
    listed: set[bytes] | None = None
    keep_alive: bytes | None = None
    for name, value in upstream_lines:
        action = actions.get(name.lower())
        if action is None:
            parts.append(name + b": " + value + b"\r\n")
        elif action == _LENGTH:
            length = value
            parts.append(name + b": " + value + b"\r\n")
        elif action == _DATE:
            dated = True
            parts.append(name + b": " + value + b"\r\n")
        elif action == _TRANSFER_ENCODING:
            chunked = True
        elif action == _CONNECTION:
            listed = _connection_listed_raw(value, listed)
        elif action == _KEEP_ALIVE:
            keep_alive = value if keep_alive is None else keep_alive + b"," + value
    if chunked or listed:
        # Rare: lines named by Connection go, and a length next to chunked coding is stale
        # (RFC 9112 §6.3) since the gateway re-frames the body.
        return _drop_listed(parts, listed or set(), chunked, extra, keep_alive)
    if extra:
        parts.append(extra.block)
    if not dated:
        parts.append(date_line())
    # tuple.__new__ skips the named tuple's own __new__, a Python function: half the cost.
    return _new_tuple(
        ResponseHead, (b"".join(parts), int(length) if length is not None else None, keep_alive)
    )


_new_tuple = tuple.__new__
# What nearly every upstream's Connection line says; none of them names another header.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


def _connection_listed_raw(value: bytes, into: set[bytes] | None) -> set[bytes] | None:
    if value in _PLAIN_CONNECTION:
        return into
    for token in value.split(b","):
        token = token.strip().lower()
        if token and token not in _HOP_BY_HOP_RAW and token not in _NEVER_CONNECTION_LISTED_RAW:
            if into is None:
                into = set()
            into.add(token)
    return into


def _drop_listed(
    parts: list[bytes],
    dropped: set[bytes],
    chunked: bool,
    extra: ExtraHeaders | None,
    keep_alive: bytes | None,
) -> ResponseHead:
    if chunked:
        dropped.add(b"content-length")
    kept = [line for line in parts if line.partition(b":")[0].lower() not in dropped]
    names = [line.partition(b":")[0].lower() for line in kept]
    length: bytes | None = None
    for name, line in zip(names, kept, strict=True):
        if name == b"content-length":
            length = line.partition(b":")[2].strip()
    if extra:
        kept.append(extra.block)
    if b"date" not in names:
        kept.append(date_line())
    return ResponseHead(b"".join(kept), int(length) if length is not None else None, keep_alive)


_HOP_BY_HOP_RAW: frozenset[bytes] = frozenset(name.encode() for name in HOP_BY_HOP)


def strip_query_param(query_string: str, name: str | None) -> str:
    """`query_string` (raw, without `?`) without every `name=...` pair.

    Every other pair keeps its place and its encoding byte for byte. Names are compared
    decoded, as the server's query parser sees them, so `api%5Fkey=...` goes too.
    """
    if not name or not query_string:
        return query_string
    kept = [
        pair
        for pair in query_string.split("&")
        if pair.partition("=")[0] != name and unquote_plus(pair.partition("=")[0]) != name
    ]
    return "&".join(kept)


def interim_head(
    status: int,
    reason: bytes,
    upstream_lines: RawHeaderLines,
    drop: frozenset[bytes] = frozenset(),
) -> bytes:
    """An upstream's interim (1xx) answer as the client gets it: its status line and its
    header lines but the hop-by-hop ones (and those its Connection header names), any
    Content-Length, which a 1xx may not have (RFC 9110 8.6), and those named in `drop`
    (lower-case)."""
    listed: set[bytes] | None = None
    kept: list[tuple[bytes, bytes]] = []
    for name, value in upstream_lines:
        lowered = name.lower()
        if lowered == b"connection":
            listed = _connection_listed_raw(value, listed)
        elif (
            lowered not in _HOP_BY_HOP_RAW and lowered != b"content-length" and lowered not in drop
        ):
            kept.append((lowered, name + b": " + value + b"\r\n"))
    lines = [line for lowered, line in kept if listed is None or lowered not in listed]
    if not reason:
        # HTTP/1.1 lets a reason be empty; the client's status line should still say one.
        reason = _PHRASES.get(status, b"Interim")
    return b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason, b"".join(lines))


_PHRASES = {status.value: status.phrase.encode() for status in HTTPStatus if status.value < 200}


def without_length(block: bytes) -> bytes:
    """A header block without its Content-Length line: for a 204, which may not have one
    (RFC 9110 8.6), though an upstream sent it. Rare, so plain."""
    return b"".join(
        line + b"\r\n"
        for line in block.split(b"\r\n")[:-1]
        if line[:15].lower() != b"content-length:"
    )


def protocols(upgrade: bytes) -> frozenset[bytes]:
    """The protocols an Upgrade value names (`websocket`, `h2c`, `foo/2`), lower-case: compared
    case-insensitively (RFC 9110 7.8)."""
    return frozenset(p for part in upgrade.split(b",") if (p := part.strip().lower()))


def switching_protocols_head(
    reason: str, upstream_lines: RawHeaderLines, extra: ExtraHeaders | None
) -> bytes:
    """The head of a 101 answer for the client: the upstream's lines cleaned as for any answer
    (`client_response_head`), with the Upgrade it switched to and `Connection: Upgrade`, which
    hop-by-hop cleaning removed but the client must see."""
    protocol = b"websocket"
    for name, value in upstream_lines:
        if name.lower() == b"upgrade":
            protocol = value
            break
    head = client_response_head(upstream_lines, extra)
    # A 1xx may not carry a Content-Length (RFC 9110 8.6), as with the interim answers: a
    # client could read that many bytes of the new protocol as the 101's body.
    block = head.block if head.content_length is None else without_length(head.block)
    return (
        status_line(101, reason or "Switching Protocols")
        + block
        + b"Connection: Upgrade\r\nUpgrade: "
        + protocol
        + b"\r\n\r\n"
    )
