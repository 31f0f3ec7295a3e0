"""Query parameter checks (gateway/params.py): what each wrong value is told."""

from __future__ import annotations

import pytest
from multidict import MultiDict

from gateway.config.model import QueryParamRule
from gateway.params import check_query
from gateway.problems import BadRequest

LIMIT = {"limit": QueryParamRule("limit", "int", min=1, max=100)}


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("abc", "'abc' is not an integer"),
        ("+7", "'+7' is not an integer"),
        ("0", "0 is less than the minimum 1"),
        ("500", "500 is greater than the maximum 100"),
        ("9" * 20, "is greater than the maximum 100"),
        ("-" + "9" * 5000, "is less than the minimum 1"),  # never handed to int()
    ],
)
def test_a_wrong_integer_is_told_why(value: str, said: str) -> None:
    with pytest.raises(BadRequest) as refused:
        check_query(LIMIT, MultiDict(limit=value))
    assert said in str(refused.value)


def test_a_long_integer_without_bounds_is_an_integer() -> None:
    check_query({"id": QueryParamRule("id", "int")}, MultiDict(id="1" * 5000))
    check_query(LIMIT, MultiDict(limit="42"))
