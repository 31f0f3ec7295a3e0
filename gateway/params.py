"""Step 4 of the request path: the declared path and query parameters of the matched route.

A path identifier that fails its `pattern` is a 404 Wrong identifier (the resource named does
not exist in the shape the API knows); every other declared parameter that is wrong is a 400
whose detail names the parameter and says why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from multidict import MultiMapping

from gateway.config.model import PathParamRule, QueryParamRule
from gateway.problems import BadRequest, WrongIdentifier

_INTEGER = re.compile(r"-?[0-9]+")
# Longer integers are not converted: int() of thousands of digits costs, and Python refuses
# more than 4,300 (a query may hold 64 KiB of them).
_MAX_DIGITS = 18


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
            problem = _query_value_problem(rule, value)
            if problem is not None:
                raise BadRequest(f"query parameter '{name}': {problem}")


def _query_value_problem(rule: QueryParamRule, value: str) -> str | None:
    if rule.type == "int":
        # int() would also take " 7", "+7" and "1_000"; an API parameter should not.
        if _INTEGER.fullmatch(value) is None:
            return f"'{value}' is not an integer"
        if len(value.lstrip("-")) > _MAX_DIGITS:
            # Compared by its sign alone: past 18 digits it is past any bound an API declares.
            if value.startswith("-") and rule.min is not None:
                return f"'{value[:20]}...' is less than the minimum {rule.min}"
            if not value.startswith("-") and rule.max is not None:
                return f"'{value[:20]}...' is greater than the maximum {rule.max}"
        else:
            number = int(value)
            if rule.min is not None and number < rule.min:
                return f"{number} is less than the minimum {rule.min}"
            if rule.max is not None and number > rule.max:
                return f"{number} is greater than the maximum {rule.max}"
    else:
        if rule.min is not None and len(value) < rule.min:
            return f"'{value}' is shorter than {rule.min} characters"
        if rule.max is not None and len(value) > rule.max:
            return f"'{value}' is longer than {rule.max} characters"
    if rule.enum is not None and value not in rule.enum:
        return f"'{value}' is not one of {', '.join(sorted(rule.enum))}"
    if rule.pattern is not None and rule.pattern.fullmatch(value) is None:
        return f"'{value}' does not match {rule.pattern.pattern}"
    return None
