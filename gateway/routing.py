"""The route table: templates compiled once, matched per request with no I/O.

A template is a path of segments: a literal, `{name}` (exactly one segment) or, last,
`{name:path}` (the rest of the path, slashes included). When several routes match a path,
the one with more literal segments wins; among equals the first declared. Routes are sorted
that way once, so matching is a walk down a short list that stops at the first hit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from gateway.config.model import Product, Route
from gateway.problems import InvalidRoute, MethodNotAllowed

# Remembered matches: at most this many, of paths at most this long (~1 MiB in all).
_MAX_KNOWN = 4096
_MAX_KNOWN_PATH = 256

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?\}$")


@dataclass(slots=True)  # not frozen: a frozen dataclass pays for object.__setattr__ per field
class RouteMatch:
    route: Route
    product: Product
    params: Mapping[str, str]  # percent-decoded values of the template's parameters
    # The same values as the path has them, escapes kept: what a redirect's target gets, so
    # that an escaped slash (`group%2Fproject`) stays one segment there too.
    raw_params: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class _CompiledRoute:
    route: Route
    product: Product
    regex: re.Pattern[str]
    literal_segments: int
    order: int


def compile_template(template: str) -> tuple[re.Pattern[str], int]:
    """The regex a raw request path must fully match, and the number of literal segments."""
    parts: list[str] = []
    literals = 0
    # A trailing "/" is kept (`/v1/items/` is not `/v1/items`), as a request path keeps it.
    for segment in template[1:].split("/"):
        param = _PARAM.match(segment)
        if param is None:
            parts.append(re.escape(segment))
            literals += 1 if segment else 0
        elif param.group(2) == "path":
            # The rest of the path, which may itself hold slashes (but not be empty).
            parts.append(f"(?P<{param.group(1)}>.+)")
        else:
            parts.append(f"(?P<{param.group(1)}>[^/]+)")
    return re.compile("/" + "/".join(parts)), literals


class RouteTable:
    def __init__(self, products: Iterable[Product]) -> None:
        compiled: list[_CompiledRoute] = []
        for product in products:
            for route in product.routes:
                regex, literals = compile_template(route.path)
                compiled.append(_CompiledRoute(route, product, regex, literals, len(compiled)))
        compiled.sort(key=lambda c: (-c.literal_segments, c.order))
        # Index by the first path segment when it is literal, so a request only walks the
        # routes that could possibly match it plus those starting with a parameter.
        self._by_first: dict[str, list[_CompiledRoute]] = {}
        self._any_first: list[_CompiledRoute] = []
        for entry in compiled:
            first = entry.route.path.strip("/").split("/", 1)[0]
            if _PARAM.match(first):
                self._any_first.append(entry)
                for bucket in self._by_first.values():
                    bucket.append(entry)
            else:
                self._by_first.setdefault(first, list(self._any_first)).append(entry)
        for bucket in self._by_first.values():
            bucket.sort(key=lambda c: (-c.literal_segments, c.order))
        self._known: dict[tuple[str, str], RouteMatch] = {}

    def match(self, method: str, raw_path: str) -> RouteMatch:
        """The best route for this path and method, or InvalidRoute / MethodNotAllowed.

        API traffic asks for the same paths again and again, so matches are remembered (per
        table, hence per config): a dict lookup instead of a regex walk. Only short paths, a
        bounded number of them; the table is dropped whole when full, which costs a path that
        never comes back nothing but one insert.
        """
        key = (method, raw_path)
        known = self._known.get(key)
        if known is not None:
            return known
        match = self._match(method, raw_path)
        if len(raw_path) <= _MAX_KNOWN_PATH:
            if len(self._known) >= _MAX_KNOWN:
                self._known.clear()
            self._known[key] = match
        return match

    def _match(self, method: str, raw_path: str) -> RouteMatch:
        first = raw_path[1:].split("/", 1)[0]
        candidates = self._by_first.get(first, self._any_first)
        allowed: set[str] = set()
        best: _CompiledRoute | None = None  # the best route whose path matched
        for entry in candidates:
            found = entry.regex.fullmatch(raw_path)
            if found is None:
                continue
            best = best or entry
            methods = entry.route.methods
            if methods is None or method in methods or (method == "HEAD" and "GET" in methods):
                raw = found.groupdict()
                params = {name: unquote(value) for name, value in raw.items()}
                return RouteMatch(entry.route, entry.product, params, raw)
            allowed.update(methods)
            if "GET" in methods:
                allowed.add("HEAD")
        if allowed and best is not None:
            allow = ", ".join(sorted(allowed))
            raise MethodNotAllowed(
                f"{method} is not allowed on this route; allowed: {allow}",
                headers={"Allow": allow},
                product=best.product.name,
                route=best.route.path,
            )
        raise InvalidRoute(f"No route matches {unquote(raw_path)}")
