from __future__ import annotations

import pytest

from gateway.config.model import Product, Route, Upstream
from gateway.problems import InvalidRoute, MethodNotAllowed
from gateway.routing import RouteTable

UPSTREAM = Upstream("http://u", "http", "u", 80, "")


def table(*routes: tuple[str, frozenset[str] | None]) -> RouteTable:
    product = Product("p", UPSTREAM, tuple(Route("p", path, methods) for path, methods in routes))
    return RouteTable([product])


def test_one_segment_parameter_does_not_cross_slashes() -> None:
    routes = table(("/a/{x}", None))
    assert routes.match("GET", "/a/1").params == {"x": "1"}
    with pytest.raises(InvalidRoute):
        routes.match("GET", "/a/1/2")


def test_path_parameter_takes_the_rest() -> None:
    routes = table(("/a/{rest:path}", None))
    assert routes.match("GET", "/a/1/2/3.json").params == {"rest": "1/2/3.json"}


def test_more_literal_segments_win_over_declaration_order() -> None:
    routes = table(("/a/{x}/c", None), ("/a/b/c", None), ("/{any:path}", None))
    assert routes.match("GET", "/a/b/c").route.path == "/a/b/c"
    assert routes.match("GET", "/a/z/c").route.path == "/a/{x}/c"
    assert routes.match("GET", "/q").route.path == "/{any:path}"


def test_first_declared_wins_among_equals() -> None:
    routes = table(("/a/{x}", None), ("/a/{y}", None))
    assert routes.match("GET", "/a/1").route.path == "/a/{x}"


def test_values_are_percent_decoded() -> None:
    routes = table(("/c/{id}", None))
    assert routes.match("GET", "/c/sr%3Acompetition%3A1").params == {"id": "sr:competition:1"}


def test_method_not_allowed_lists_every_allowed_method() -> None:
    routes = table(("/a", frozenset({"GET"})), ("/{x}", frozenset({"POST"})))
    with pytest.raises(MethodNotAllowed) as caught:
        routes.match("DELETE", "/a")
    assert caught.value.headers["Allow"] == "GET, HEAD, POST"
    assert routes.match("HEAD", "/a").route.path == "/a"
    assert routes.match("POST", "/a").route.path == "/{x}"


def test_no_route() -> None:
    with pytest.raises(InvalidRoute):
        table(("/a", None)).match("GET", "/b")
    assert table(("/", None)).match("GET", "/").route.path == "/"


def test_a_path_asked_again_is_answered_from_memory_and_alike() -> None:
    routes = table(("/a/{x}", frozenset({"GET"})))
    first = routes.match("GET", "/a/%41")
    again = routes.match("GET", "/a/%41")
    assert again is first and again.params == {"x": "A"}
    # The method is part of what is remembered: the same path is still refused for POST.
    with pytest.raises(MethodNotAllowed):
        routes.match("POST", "/a/%41")
    # A new table (a reload) starts with nothing remembered.
    assert table(("/a/{x}", None)).match("GET", "/a/%41") is not first


def test_remembered_paths_stay_bounded() -> None:
    routes = table(("/a/{rest:path}", None))
    long_path = "/a/" + "x" * 300
    assert routes.match("GET", long_path) is not routes.match("GET", long_path)
    for i in range(5000):
        routes.match("GET", f"/a/{i}")
    assert len(routes._known) <= 4096


def test_a_trailing_slash_is_part_of_the_route() -> None:
    """`/v1/items/` matched `/v1/items` (and never `/v1/items/`), taking its requests from the
    route declared as `/v1/items`."""
    routes = table(("/v1/items/", None), ("/v1/items", None), ("/v1/{x}/", None))
    assert routes.match("GET", "/v1/items/").route.path == "/v1/items/"
    assert routes.match("GET", "/v1/items").route.path == "/v1/items"
    assert routes.match("GET", "/v1/other/").route.path == "/v1/{x}/"
    with pytest.raises(InvalidRoute):
        routes.match("GET", "/v1/other")
