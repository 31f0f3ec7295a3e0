"""Header and query hygiene between the client and the upstream (CONTRACT.md §5).

Pure functions over header lines: repeated headers are kept line by line in order
(`Set-Cookie`, `Cache-Control`, ...), so a multi-dict or a list of pairs goes in and a
`CIMultiDict` comes out, never a plain dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import unquote_plus

from multidict import CIMultiDict, CIMultiDictProxy

HeaderLines = CIMultiDict[str] | CIMultiDictProxy[str] | Iterable[tuple[str, str]]

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


def _lines(headers: HeaderLines) -> Iterable[tuple[str, str]]:
    if isinstance(headers, CIMultiDict | CIMultiDictProxy):
        return headers.items()
    return headers


def connection_listed(headers: HeaderLines) -> frozenset[str]:
    """The lower-cased header names that the Connection header(s) declare hop-by-hop."""
    names: set[str] = set()
    for name, value in _lines(headers):
        if name.lower() == "connection":
            for token in value.split(","):
                token = token.strip().lower()
                if token and token not in _NEVER_CONNECTION_LISTED:
                    names.add(token)
    return frozenset(names)


def _end_to_end(headers: HeaderLines, also_drop: Iterable[str] = ()) -> CIMultiDict[str]:
    lines = list(_lines(headers))
    dropped = HOP_BY_HOP | connection_listed(lines) | {name.lower() for name in also_drop}
    return CIMultiDict((name, value) for name, value in lines if name.lower() not in dropped)


def upstream_request_headers(
    client_headers: HeaderLines,
    *,
    key_header: str,
    upstream_host: str,
    client_ip: str | None,
    client_proto: str,
    request_id: str,
) -> CIMultiDict[str]:
    """The headers to send upstream for a client request.

    Hop-by-hop headers and the API key header go; Host becomes the upstream's;
    X-Forwarded-For gets the peer appended; X-Forwarded-Proto, X-Forwarded-Host and
    X-Request-ID are the gateway's own view, whatever the client claimed.
    """
    lines = list(_lines(client_headers))
    client_host = next((value for name, value in lines if name.lower() == "host"), None)
    forwarded_for = [value for name, value in lines if name.lower() == "x-forwarded-for"]
    headers = _end_to_end(
        lines,
        also_drop=(
            key_header,
            "host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-request-id",
        ),
    )
    headers["Host"] = upstream_host
    if client_ip:
        forwarded_for.append(client_ip)
    if forwarded_for:
        headers["X-Forwarded-For"] = ", ".join(forwarded_for)
    headers["X-Forwarded-Proto"] = client_proto
    if client_host is not None:
        headers["X-Forwarded-Host"] = client_host
    headers["X-Request-ID"] = request_id
    return headers


def client_response_headers(
    upstream_headers: HeaderLines, extra: Mapping[str, str] | None = None
) -> CIMultiDict[str]:
    """The headers to send the client for an upstream answer.

    `extra` (the gateway's X-Request-ID and rate-limit headers) replaces any line of the
    same name the upstream sent: those headers describe the gateway's decision.
    """
    lines = list(_lines(upstream_headers))
    chunked = any(name.lower() == "transfer-encoding" for name, _ in lines)
    # Transfer-Encoding overrides Content-Length (RFC 9112 §6.3); since the gateway re-frames
    # the body, a stale length next to it would be a lie to the client.
    headers = _end_to_end(lines, also_drop=("content-length",) if chunked else ())
    if extra:
        for name, value in extra.items():
            headers[name] = value
    return headers


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
