"""The normal form of a request path (gateway/http/paths.py)."""

from __future__ import annotations

import pytest

from gateway.http.paths import hides_dot_segment, normal_path


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("/soccer/v4/en/info.json", "/soccer/v4/en/info.json"),
        ("/", "/"),
        ("/soccer/%72eports/x", "/soccer/reports/x"),
        ("/a/%7e%41%2d%2E%5f%30", "/a/~A-._0"),
        ("/a/%2fb%3f%20%25%c3%a9", "/a/%2Fb%3F%20%25%C3%A9"),
        ("/a/b/../c", "/a/c"),
        ("/a/./b/.", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/../../a", "/a"),
        ("/a/%2e%2E/b", "/b"),
        ("/a//b///c/", "/a/b/c/"),
        ("//", "/"),
        ("/a/..b/.c/c.", "/a/..b/.c/c."),
        ("/a/%", "/a/%"),
        ("/a/%zz/%4", "/a/%zz/%4"),
    ],
)
def test_normal_path(path: str, normal: str) -> None:
    assert normal_path(path) == normal
    assert normal_path(normal) == normal  # normal already


@pytest.mark.parametrize(
    ("path", "hides"),
    [
        ("/p/cheap/..%2F..%2Fp/old/x", True),
        ("/p/cheap/..%2freports/x", True),
        ("/p/cheap/..;/old/x", True),
        ("/p/cheap/..\\old\\x", True),
        ("/p/cheap/..%5Cold", True),
        ("/p/cheap/.%2Fx", True),
        ("/p/group%2Fproject/info", False),  # an escaped slash inside a name is fine
        ("/p/items;v=1/x", False),
        ("/p/a..b%2Fc/..x;y", False),
        ("/p/plain/path", False),
    ],
)
def test_hides_dot_segment(path: str, hides: bool) -> None:
    assert hides_dot_segment(normal_path(path)) is hides
