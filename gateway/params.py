"""Step 4 of the request path: the declared path and query parameters of the matched route.

A path identifier that fails its `pattern` is a 404 Wrong identifier (the resource named does
not exist in the shape the API knows); every other declared parameter that is wrong is a 400
whose detail names the parameter and says why.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import MultiMapping

from gateway.config.model import PathParamRule, QueryParamRule
from gateway.problems import BadRequest, WrongIdentifier


def check_path_params(rules: Mapping[str, PathParamRule], values: Mapping[str, str]) -> None:
    for name, rule in rules.items():
        value = values.get(name, "")
        if rule.enum is not None and value not in rule.enum:
            allowed = ", ".join(sorted(rule.enum))
            raise BadRequest(f"path parameter '{name}': '{value}' is not one of {allowed}")
        if rule.pattern is not None and rule.pattern.fullmatch(value) is None:
            raise WrongIdentifier(
                f"path parameter '{name}': '{value}' does not match {rule.pattern.pattern}"
            )


def check_query(rules: Mapping[str, QueryParamRule], query: MultiMapping[str]) -> None:
    for name, rule in rules.items():
        values = query.getall(name, [])
        if not values:
            if rule.required:
                raise BadRequest(f"query parameter '{name}' is required")
            continue
        for value in values:
            problem = rule.refuses(value)
            if problem is not None:
                raise BadRequest(f"query parameter '{name}': {problem}")
