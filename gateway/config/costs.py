"""Where a route's upstream reports what a request cost (README, "Metering", "A cost the
upstream reports"): `cost_header`, a header of its answer, or `cost_field`, a field of its JSON
body or of its server-sent events' JSON data (or a list of fields, added up, each times its
weight). A route reads one of them."""

from __future__ import annotations

import re

from gateway.config.model import CostField
from gateway.config.yamlnodes import Fields, Walker
from gateway.config.yamltree import MappingNode, Node, SequenceNode
from gateway.http.headers import HOP_BY_HOP

__all__ = ["HTTP_TOKEN", "read_cost_source"]

HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# What a cost_header may not be: HTTP's framing and hop-by-hop lines (an upstream's are not
# the answer's to keep), and the answer headers the gateway sets itself (README, "Headers").
_NOT_A_COST_HEADER = HOP_BY_HOP | {"content-length", "content-type", "date", "location"}
_GATEWAY_ANSWER_HEADER = re.compile(r"(x-)?ratelimit(-.*)?|x-quota-.*|x-request-id|retry-after")
# A cost_field: names of JSON object members, from the document's top, joined by dots.
_FIELD_NAME = re.compile(r"[A-Za-z0-9_$@-]+")
_MAX_FIELD_DEPTH = 8
_MAX_FIELDS = 4
# A field's weight: whole units per unit it counts, so that a cost stays a whole number; a
# price below one unit per token is a quota counted in tokens with the others' weights raised.
_MAX_WEIGHT = 1_000_000


def read_cost_source(
    w: Walker, fields: Fields, proxies: bool
) -> tuple[bytes | None, tuple[CostField, ...] | None]:
    """A route's `cost_header` (lower-cased, as raw lines are matched, once here rather than
    per request) and `cost_field` (its names); `proxies`: the route has an upstream to report
    one (not `gone`, not `redirect`)."""
    header = w.optional(fields, "cost_header", lambda n, p: _cost_header(w, n, p), None)
    field = w.optional(fields, "cost_field", lambda n, p: _cost_fields(w, n, p), None)
    for key in ("cost_header", "cost_field"):
        node = fields.value(key)
        if node is not None and not proxies:
            message = "a retired or redirected route has no upstream to report a cost"
            w.report(node, fields.at(key), message)
    if header is not None and field is not None:
        node = fields.value("cost_field")
        assert node is not None
        w.report(
            node,
            fields.at("cost_field"),
            "a route reads its cost in one place, not also in cost_header",
        )
    return (None if header is None else header.lower().encode("ascii")), field


def _cost_header(w: Walker, node: Node, path: str) -> str | None:
    text = w.string(node, path)
    if text is None:
        return None
    if not HTTP_TOKEN.fullmatch(text):
        w.report(node, path, "must be an HTTP header name")
        return None
    lowered = text.lower()
    if lowered in _NOT_A_COST_HEADER or _GATEWAY_ANSWER_HEADER.fullmatch(lowered):
        w.report(node, path, f"must not be {text}: HTTP or the gateway uses that header")
        return None
    return text


def _cost_fields(w: Walker, node: Node, path: str) -> tuple[CostField, ...] | None:
    """One field, or a list of them whose values add up (input and output tokens, where an
    API reports them apart), each a path or a mapping of its path and weight."""
    if not isinstance(node, SequenceNode):
        one = _cost_field(w, node, path)
        return None if one is None else (one,)
    items = w.sequence(node, path)
    if items is None:
        return None
    if not 1 <= len(items) <= _MAX_FIELDS:
        w.report(node, path, f"must list 1 to {_MAX_FIELDS} fields")
        return None
    read = [_cost_field(w, item, f"{path}[{index}]") for index, item in enumerate(items)]
    chosen = tuple(one for one in read if one is not None)
    if len(chosen) < len(read):
        return None
    if len({one.path for one in chosen}) < len(chosen):
        w.report(node, path, "lists a field twice: it would be added up twice")
        return None
    return chosen


def _cost_field(w: Walker, node: Node, path: str) -> CostField | None:
    """`usage.total_tokens`, or `{field: usage.output_tokens, weight: 5}`."""
    if not isinstance(node, MappingNode):
        names = _field_path(w, node, path)
        return None if names is None else CostField(names)
    fields = w.mapping(node, path, ("field", "weight"))
    if fields is None:
        return None
    names = w.required(fields, "field", lambda n, p: _field_path(w, n, p))
    weight: int | None = 1
    weight_node = fields.value("weight")
    written = None if weight_node is None else w.scalar(weight_node)
    if isinstance(written, float) and not written.is_integer():
        message = "must be a whole number: count the quota in the smaller unit instead"
        w.report(weight_node, fields.at("weight"), message)
        weight = None
    elif weight_node is not None:
        weight = w.integer(weight_node, fields.at("weight"), minimum=1, maximum=_MAX_WEIGHT)
    if names is None or weight is None:
        return None
    return CostField(names, weight)


def _field_path(w: Walker, node: Node, path: str) -> tuple[str, ...] | None:
    text = w.string(node, path)
    if text is None:
        return None
    names = tuple(text.split("."))
    if not all(_FIELD_NAME.fullmatch(name) for name in names) or len(names) > _MAX_FIELD_DEPTH:
        hint = f"at most {_MAX_FIELD_DEPTH} names of [A-Za-z0-9_$@-]+ joined by dots"
        w.report(node, path, f"must be a JSON field's path such as usage.total_tokens: {hint}")
        return None
    return names
