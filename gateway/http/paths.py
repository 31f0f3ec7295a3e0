r"""The request path in its normal form (RFC 3986, section 6.2.2), before anything reads it.

Routing decides by the path (which route, hence the cost, `gone`, the precedence of literal
segments), and the upstream serves by it. If the two read one path differently, a client can
choose the route: `/soccer/%72eports/x` is not the literal `/soccer/reports/...` to a router
that compares text, but it is to an upstream that decodes it; `/soccer/x/../v3/a` reaches the
retired v3 behind an upstream that resolves dot segments. So the path is normalised once, as
it comes in, and both the routes and the upstream get the normal form:

- a percent-encoded unreserved character (`A-Z a-z 0-9 - . _ ~`) is decoded; the hex digits of
  any other escape are upper-cased (`%2f` -> `%2F`), which means the same;
- the dot segments `.` and `..` are resolved (never above the root);
- empty segments are merged (`//` -> `/`), as nginx does by default.

Other escapes stay as they are: decoding `%2F` or `%3F` would change the path's meaning. That
leaves dot segments some upstreams find where the router sees none: `..%2F` (decoded, then
resolved, by nginx and many file servers), `..;` (Tomcat's path parameters), `..\` (IIS).
`hides_dot_segment` finds those, for the caller to refuse.
"""

from __future__ import annotations

import re

_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def normal_path(path: str) -> str:
    """`path` (origin-form, starting with "/") in its normal form."""
    # Most paths have nothing to normalise: three substring tests and no allocation.
    if "%" not in path and "/." not in path and "//" not in path:
        return path
    if "%" in path:
        path = _ESCAPE.sub(_unescape, path)
    segments = path.split("/")
    kept: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment and segment != ".":
            kept.append(segment)
    # A path that ended in a directory (`/a/`, `/a/.`, `/a/b/..`) still does.
    directory = segments[-1] in ("", ".", "..")
    return "/" + "/".join(kept) + ("/" if directory and kept else "")


def _unescape(escape: re.Match[str]) -> str:
    code = int(escape.group()[1:], 16)
    return chr(code) if code in _UNRESERVED else escape.group().upper()


# What some servers take for a segment's end besides "/".
_OTHER_SEPARATORS = re.compile(r"%2[Ff]|%5[Cc]|\\|;")


def hides_dot_segment(path: str) -> bool:
    """Whether `path` (normal) holds a `.` or `..` segment behind an escaped slash, a
    backslash or a `;`, one that an upstream could resolve where routing did not."""
    if "%" not in path and "\\" not in path and ";" not in path:
        return False
    return any(
        piece in (".", "..")
        for segment in path.split("/")
        for piece in _OTHER_SEPARATORS.split(segment)
    )
