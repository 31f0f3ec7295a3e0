"""The `products` section: upstreams, maintenance and routes with their path templates."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.utils import format_datetime
from typing import Literal
from urllib.parse import quote, urlsplit

from gateway.config.costs import HTTP_TOKEN, read_cost_source
from gateway.config.model import (
    Gone,
    Maintenance,
    PathParamRule,
    Product,
    QueryParamRule,
    Redirect,
    Route,
    Upstream,
)
from gateway.config.yamlnodes import Fields, Walker, line_of
from gateway.config.yamltree import MappingNode, Node
from gateway.http.parsing import parser_knows_method
from gateway.http.paths import normal_path

# Names end up in metrics labels, log lines and URLs of the admin API.
# Not `.` or `..`: names appear in admin URLs' paths, where clients remove such segments.
NAME = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9_.-]+")
NAME_HINT = "must match [A-Za-z0-9_.-]+ and not be '.' or '..'"

_PRODUCT_KEYS = ("upstream", "maintenance", "routes")
_UPSTREAM_KEYS = ("url", "connect_timeout", "timeout", "identity_headers")
_MAINTENANCE_KEYS = ("retry_after", "message")
# What a URL may hold as written (RFC 3986 characters, `{}` for placeholders): no controls,
# spaces or bytes outside ASCII.
_URL_TEXT = re.compile(r"[\x21-\x7e]+")
_ROUTE_KEYS = (
    "path", "methods", "params", "query", "gone", "redirect", "websocket", "cost", "cost_header",
    "cost_field",
)  # fmt: skip
_PATH_RULE_KEYS = ("enum", "pattern")
_QUERY_RULE_KEYS = ("type", "min", "max", "required", "enum", "pattern")

# Upstream has required fields, so its defaults cannot come from an instance.
_UPSTREAM_DEFAULTS: dict[str, float] = {
    field.name: field.default
    for field in dataclasses.fields(Upstream)
    if isinstance(field.default, float)
}

_PARAM = re.compile(r"\{(?P<name>[^{}:]*)(?::(?P<kind>[^{}]*))?\}")
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TYPES = ("int", "string")
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True, slots=True)
class Template:
    """What a path template declares: its parameter names and its shape.

    The shape replaces parameter names by `{}` / `{:path}`, so `/a/{x}` and `/a/{y}` are
    recognised as the same route.
    """

    params: tuple[str, ...]
    shape: str


def parse_template(template: str) -> tuple[Template, list[str]]:
    """Split a route path into parameters; the list holds every problem found."""
    if not template.startswith("/"):
        return Template((), template), ["must start with /"]
    problems: list[str] = []
    if "?" in template or "#" in template:
        problems.append("must not contain ? or # (declare query parameters under `query`)")
    names: list[str] = []
    shape: list[str] = []
    segments = template[1:].split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if "{" not in segment and "}" not in segment:
            if segment == "" and not last:
                problems.append("must not contain an empty segment (//)")
            elif segment and (problem := _unmatchable_literal(segment)):
                problems.append(problem)
            shape.append(segment)
            continue
        match = _PARAM.fullmatch(segment)
        if match is None:
            problems.append(f"{segment!r}: a parameter must fill a whole segment, like {{name}}")
            continue
        name, kind = match["name"], match["kind"]
        if not _PARAM_NAME.fullmatch(name):
            problems.append(f"{segment}: invalid parameter name {name!r}")
        if kind is not None and kind != "path":
            problems.append(f"{segment}: unknown parameter kind {kind!r} (only {{name:path}})")
        elif kind == "path" and not last:
            problems.append(f"{segment} must be the last segment")
        if name in names:
            problems.append(f"parameter {name!r} appears twice")
        names.append(name)
        shape.append("{:path}" if kind == "path" else "{}")
    return Template(tuple(names), "/" + "/".join(shape)), problems


def _encodes_as_a_host_name(host: str) -> bool:
    """Whether `host` can go in a Host header (as the upstream client sends it, IDNA-encoded):
    `api..example`, a label over 63 characters or a space cannot, and failed only once the
    gateway began to serve the config."""
    if any(char.isspace() or not char.isprintable() for char in host):
        return False  # the IDNA codec lets them through
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def _taken(earlier: frozenset[str] | None, later: frozenset[str] | None) -> frozenset[str] | None:
    """Which of `later`'s methods a route taking `earlier` gets first (None: every method),
    `GET` taking `HEAD` as routing does."""
    if earlier is None:
        return later
    if later is None:
        return frozenset()  # the rest of the methods are left to it
    takes = earlier | {"HEAD"} if "GET" in earlier else earlier
    return later & takes


# Every visible ASCII character: what `quote` leaves as it is, for normal_path to judge.
_VISIBLE_ASCII = "".join(chr(code) for code in range(0x21, 0x7F))


def _unmatchable_literal(segment: str) -> str | None:
    """Why a literal segment of a route path can never match: routes match a request's path
    in its normal form (gateway.http.paths), which holds no dot segment, no raw space or
    non-ASCII character, no escape of an unreserved character, no lower-case escape."""
    if segment in (".", ".."):
        return f"{segment!r}: a dot segment is resolved in every request path, never matched"
    written = "/" + quote(segment, safe=_VISIBLE_ASCII)
    normal = normal_path(written)
    if normal == "/" + segment:
        return None
    return (
        f"{segment!r} is never matched: request paths arrive in normal form; write {normal[1:]!r}"
    )


def _parameters_hint(params: tuple[str, ...]) -> str:
    return f"parameters: {', '.join(params)}" if params else "the path has no parameters"


class ProductsReader:
    """Reads the `products` section of one file."""

    def __init__(self, walker: Walker) -> None:
        self.w = walker
        # (shape, where in the config, line, methods) of every route read so far
        self._seen: list[tuple[str, str, int, frozenset[str] | None]] = []

    def read(self, node: Node, path: str = "products") -> tuple[dict[str, Product], set[str]]:
        """The valid products, and the names of all declared ones (for cross-checks)."""
        fields = self.w.mapping(node, path)
        if fields is None:
            return {}, set()
        if not fields.entries:
            self.w.report(node, path, "must declare at least one product")
        products: dict[str, Product] = {}
        for name, key, value in fields:
            if not NAME.fullmatch(name):
                self.w.report(key, fields.at(name), NAME_HINT)
                continue
            product = self._product(name, value, fields.at(name))
            if product is not None:
                products[name] = product
        return products, set(fields.entries)

    def _product(self, name: str, node: Node, path: str) -> Product | None:
        fields = self.w.mapping(node, path, _PRODUCT_KEYS)
        if fields is None:
            return None
        upstream = self.w.required(fields, "upstream", self._upstream)
        maintenance_node = fields.value("maintenance")
        maintenance = None
        if maintenance_node is not None:
            maintenance = self._maintenance(maintenance_node, fields.at("maintenance"))
        routes = self.w.required(fields, "routes", lambda n, p: self._routes(name, n, p))
        if upstream is None or routes is None:
            return None
        return Product(name, upstream, routes, maintenance)

    def _upstream(self, node: Node, path: str) -> Upstream | None:
        fields = self.w.mapping(node, path, _UPSTREAM_KEYS)
        if fields is None:
            return None
        url = self.w.required(fields, "url", self.w.string)
        connect_timeout = self.w.optional(
            fields, "connect_timeout", self.w.duration, _UPSTREAM_DEFAULTS["connect_timeout"]
        )
        timeout = self.w.optional(fields, "timeout", self.w.duration, _UPSTREAM_DEFAULTS["timeout"])
        identity = self.w.optional(fields, "identity_headers", self.w.boolean, False)
        if url is None:
            return None
        url_node = fields.value("url")
        try:
            parts = urlsplit(url)
        except ValueError:
            # urllib's "Invalid IPv6 URL", which went up as a traceback out of `gateway check`.
            misplaced = "has a '[' or ']' out of place (an IPv6 host is written http://[::1]:9000)"
            self.w.report(url_node, fields.at("url"), misplaced)
            return None
        try:
            port = parts.port
        except ValueError:
            self.w.report(url_node, fields.at("url"), "has an invalid port")
            return None
        problem = None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problem = "must be an http:// or https:// URL with a host"
        elif parts.query or parts.fragment:
            problem = "must not have a query or fragment (the request's own are appended)"
        elif parts.username is not None or parts.password is not None:
            problem = "must not carry credentials"
        elif ":" not in parts.hostname and not _encodes_as_a_host_name(parts.hostname):
            problem = (
                f"host {parts.hostname!r} is not a valid host name "
                "(a space, an empty or long label)"
            )
        if problem is not None:
            self.w.report(url_node, fields.at("url"), problem)
            return None
        scheme: Literal["http", "https"] = "https" if parts.scheme == "https" else "http"
        return Upstream(
            url=url,
            scheme=scheme,
            host=parts.hostname or "",
            port=port if port is not None else (443 if scheme == "https" else 80),
            base_path=parts.path.rstrip("/"),
            connect_timeout=connect_timeout,
            timeout=timeout,
            identity_headers=identity,
        )

    def _maintenance(self, node: Node, path: str) -> Maintenance | None:
        value = self.w.scalar(node)
        if isinstance(value, bool):
            return Maintenance() if value else None
        if not isinstance(node, MappingNode):
            self.w.report(node, path, "must be true, false or {retry_after: ..., message: ...}")
            return None
        fields = self.w.mapping(node, path, _MAINTENANCE_KEYS)
        if fields is None:
            return None
        default = Maintenance()
        retry_after = self.w.optional(
            fields, "retry_after", lambda n, p: self.w.integer(n, p, minimum=0), default.retry_after
        )
        message = self.w.optional(fields, "message", self.w.string, default.message)
        return Maintenance(retry_after, message)

    # -- routes ---------------------------------------------------------------------------

    def _routes(self, product: str, node: Node, path: str) -> tuple[Route, ...] | None:
        items = self.w.sequence(node, path)
        if items is None:
            return None
        if not items:
            self.w.report(node, path, "must declare at least one route")
            return None
        routes = [
            self._route(product, item, f"{path}[{index}]") for index, item in enumerate(items)
        ]
        valid = tuple(route for route in routes if route is not None)
        return valid if len(valid) == len(routes) else None

    def _route(self, product: str, node: Node, path: str) -> Route | None:
        fields = self.w.mapping(node, path, _ROUTE_KEYS)
        if fields is None:
            return None
        text = self.w.required(fields, "path", self.w.string)
        template = None
        if text is not None:
            template, problems = parse_template(text)
            for problem in problems:
                self.w.report(fields.value("path"), fields.at("path"), problem)
            if problems:
                template = None
        methods = self.w.optional(fields, "methods", self._methods, None)
        params = self._path_rules(fields, template)
        no_rules: dict[str, QueryParamRule] = {}
        query = self.w.optional(fields, "query", self._query_rules, no_rules)
        gone = self.w.optional(fields, "gone", self._gone, None)
        cost = self.w.optional(fields, "cost", self.w.positive, 1)
        redirect = None
        if "redirect" in fields:
            redirect = self._redirect(fields, template)
            if "gone" in fields:
                self.w.report(
                    fields.entries["redirect"][0], path, "gone and redirect exclude each other"
                )
        websocket = self.w.optional(fields, "websocket", self.w.boolean, False)
        if websocket and (gone is not None or redirect is not None):
            message = "a retired or redirected route proxies nothing"
            self.w.report(fields.entries["websocket"][0], path, message)
        cost_header, cost_field = read_cost_source(
            self.w, fields, proxies=gone is None and redirect is None
        )
        if websocket and methods is not None and "GET" not in methods:
            message = "must include GET on a websocket route"
            self.w.report(fields.value("methods"), fields.at("methods"), message)
        if text is None or template is None:
            return None
        self._check_unique(template, methods, fields)
        return Route(
            product=product,
            path=text,
            methods=methods,
            params=params,
            query=query,
            gone=gone,
            redirect=redirect,
            websocket=websocket,
            cost=cost,
            cost_header=cost_header,
            cost_field=cost_field,
            line=line_of(node),
        )

    def _check_unique(
        self, template: Template, methods: frozenset[str] | None, fields: Fields
    ) -> None:
        """A route of the same shape as earlier ones gets only the methods they do not take
        (routing: the first that accepts the method wins): never matched when they take all of
        its methods, and told which are taken when they take some. Every method (no `methods`)
        after some is the rest, the usual fallback, and fine."""
        for shape, other_path, other_line, other_methods in self._seen:
            if shape != template.shape:
                continue
            taken = _taken(other_methods, methods)
            if taken is None or taken == methods:
                self.w.report(
                    fields.value("path"),
                    fields.at("path"),
                    f"never matched: {other_path} (line {other_line}) has the same path "
                    "and methods",
                )
                return
            if taken:
                them = "it" if len(taken) == 1 else "them"
                self.w.report(
                    fields.value("methods"),
                    fields.at("methods"),
                    f"{', '.join(sorted(taken))} never matched: {other_path} (line {other_line})"
                    f" has the same path and takes {them} first",
                )
                return
        self._seen.append((template.shape, fields.path, line_of(fields.node), methods))

    def _methods(self, node: Node, path: str) -> frozenset[str] | None:
        words = self.w.words(node, path)
        if words is None:
            return None
        for index, word in enumerate(words):
            # A method the parser does not know is a 400 before routing: a route that names
            # one could never be reached.
            if not HTTP_TOKEN.fullmatch(word) or not parser_knows_method(word.upper()):
                self.w.report(node, f"{path}[{index}]", f"{word!r} is not an HTTP method")
                return None
            if word.upper() == "CONNECT":
                # Refused before routing (a 400): the gateway never opens a tunnel to a host
                # its client names.
                self.w.report(node, f"{path}[{index}]", "CONNECT is never proxied")
                return None
        methods = [word.upper() for word in words]
        # Reported, and the set kept: what the route takes is clear, and so are its neighbours.
        self.w.distinct(node, path, methods, "method")
        return frozenset(methods)

    def _path_rules(self, fields: Fields, template: Template | None) -> dict[str, PathParamRule]:
        node = fields.value("params")
        if node is None:
            return {}
        rules_fields = self.w.mapping(node, fields.at("params"))
        if rules_fields is None:
            return {}
        rules: dict[str, PathParamRule] = {}
        for name, key, value in rules_fields:
            path = rules_fields.at(name)
            if template is not None and name not in template.params:
                hint = _parameters_hint(template.params)
                self.w.report(key, path, f"not a parameter of the path ({hint})")
                continue
            rule = self.w.mapping(value, path, _PATH_RULE_KEYS)
            if rule is None:
                continue
            enum = self.w.optional(rule, "enum", self.w.distinct_words, None)
            pattern = self.w.optional(rule, "pattern", self.w.regex, None)
            rules[name] = PathParamRule(name, None if enum is None else frozenset(enum), pattern)
        return rules

    def _query_rules(self, node: Node, path: str) -> dict[str, QueryParamRule] | None:
        fields = self.w.mapping(node, path)
        if fields is None:
            return None
        rules: dict[str, QueryParamRule] = {}
        for name, _key, value in fields:
            rule = self._query_rule(name, value, fields.at(name))
            if rule is not None:
                rules[name] = rule
        return rules

    def _query_rule(self, name: str, node: Node, path: str) -> QueryParamRule | None:
        fields = self.w.mapping(node, path, _QUERY_RULE_KEYS)
        if fields is None:
            return None
        kind = self.w.optional(fields, "type", lambda n, p: self.w.choice(n, p, _TYPES), "string")
        low = self.w.optional(fields, "min", self.w.integer, None)
        high = self.w.optional(fields, "max", self.w.integer, None)
        if kind == "string" and low is not None and low < 0:
            self.w.report(fields.value("min"), fields.at("min"), "a length must be at least 0")
        if low is not None and high is not None and low > high:
            self.w.report(fields.value("max"), fields.at("max"), f"must be at least min ({low})")
        enum = self.w.optional(fields, "enum", self.w.distinct_words, None)
        rule = QueryParamRule(
            name=name,
            type="int" if kind == "int" else "string",
            min=low,
            max=high,
            required=self.w.optional(fields, "required", self.w.boolean, False),
            enum=None if enum is None else frozenset(enum),
            pattern=self.w.optional(fields, "pattern", self.w.regex, None),
        )
        for word in enum or ():
            # A value the rule's other parts refuse can never be sent: every request is a 400.
            problem = dataclasses.replace(rule, enum=None).refuses(word)
            if problem is not None:
                self.w.report(fields.value("enum"), fields.at("enum"), f"never accepted: {problem}")
                break
        return rule

    def _gone(self, node: Node, path: str) -> Gone | None:
        value = self.w.scalar(node)
        if isinstance(value, bool):
            return Gone() if value else None
        if not isinstance(node, MappingNode):
            self.w.report(node, path, "must be true, false or {sunset: YYYY-MM-DD}")
            return None
        fields = self.w.mapping(node, path, ("sunset",))
        sunset_node = None if fields is None else fields.value("sunset")
        if fields is None or sunset_node is None:
            return Gone()
        sunset = self._date(sunset_node, fields.at("sunset"))
        return None if sunset is None else Gone(format_datetime(sunset, usegmt=True))

    def _date(self, node: Node, path: str) -> datetime | None:
        value = self.w.scalar(node)
        if isinstance(value, str) and _ISO_DATE.fullmatch(value):
            with contextlib.suppress(ValueError):
                value = date.fromisoformat(value)
        if isinstance(value, datetime):
            return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, date):
            return datetime(value.year, value.month, value.day, tzinfo=UTC)
        self.w.report(node, path, "must be a date like 2026-01-01")
        return None

    def _redirect(self, fields: Fields, template: Template | None) -> Redirect | None:
        redirect = self.w.mapping(
            fields.entries["redirect"][1], fields.at("redirect"), ("to", "permanent")
        )
        if redirect is None:
            return None
        to = self.w.required(redirect, "to", self.w.string)
        permanent = self.w.optional(redirect, "permanent", self.w.boolean, False)
        if to is None:
            return None
        to_node, to_path = redirect.value("to"), redirect.at("to")
        if not to.startswith(("/", "http://", "https://")):
            self.w.report(to_node, to_path, "must be a path starting with / or an http(s):// URL")
            return None
        if _URL_TEXT.fullmatch(to) is None:
            # It becomes a Location header as written: a line break would start another
            # header, and bytes outside ASCII are not a URL (percent-encode them).
            self.w.report(
                to_node, to_path, "must be visible ASCII without spaces (percent-encode others)"
            )
            return None
        if "{" in _PLACEHOLDER.sub("", to) or "}" in _PLACEHOLDER.sub("", to):
            self.w.report(to_node, to_path, "has an unbalanced { or }")
            return None
        if template is not None:
            for name in _PLACEHOLDER.findall(to):
                if name not in template.params:
                    hint = _parameters_hint(template.params)
                    self.w.report(
                        to_node, to_path, f"{{{name}}} is not a parameter of the path ({hint})"
                    )
                    return None
        return Redirect(to, permanent)
