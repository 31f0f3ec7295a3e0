"""The key a request presents (gateway/auth.py): where it is read, and two refused."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

from gateway.auth import presented_key
from gateway.config.model import AuthConfig
from gateway.http.request import NO_BODY, Request
from gateway.http.server_connection import ServerConnection
from gateway.problems import Unauthorized

AUTH = AuthConfig()
HEADER = b"x-api-key"


def request(target: bytes, *lines: tuple[bytes, bytes]) -> Request:
    # Only its peer and scheme are read from the connection while the request is made.
    connection = cast(ServerConnection, SimpleNamespace(remote="127.0.0.1", scheme="http"))
    return Request(connection, "GET", target, list(lines), "1.1", True, NO_BODY)


@pytest.mark.parametrize(
    ("target", "lines", "key"),
    [
        (b"/x", [], None),
        (b"/x", [(b"X-API-Key", b"a")], "a"),
        (b"/x", [(b"x-api-KEY", b"a"), (b"X-Api-Key", b"a")], "a"),
        (b"/x?api_key=b", [], "b"),
        (b"/x?api%5Fkey=b", [], "b"),  # names are compared decoded, as they are removed
        (b"/x?api_key=b", [(b"X-API-Key", b"")], "b"),  # an empty key is none
        (b"/x?api_key=&api_key=b", [], "b"),
        (b"/x?api_key=a", [(b"X-API-Key", b"a")], "a"),
        (b"/x", [(b"X-API-Key", b"secr\xe9t")], "secr\udce9t"),  # kept for the 401 it gets
    ],
)
def test_the_key_presented(
    target: bytes, lines: list[tuple[bytes, bytes]], key: str | None
) -> None:
    assert presented_key(request(target, *lines), AUTH, HEADER) == key


def test_without_a_query_parameter_the_query_is_not_read() -> None:
    auth = AuthConfig(query_param=None)
    assert presented_key(request(b"/x?api_key=a&api_key=b"), auth, HEADER) is None


@pytest.mark.parametrize(
    ("target", "lines", "where"),
    [
        (b"/x", [(b"X-API-Key", b"a"), (b"x-api-key", b"b")], "X-API-Key header"),
        (b"/x?api_key=a&api%5Fkey=b", [], "api_key query parameter"),
        (b"/x?api_key=b", [(b"X-API-Key", b"a")], "header and the api_key query parameter"),
    ],
)
def test_two_different_keys_are_refused(
    target: bytes, lines: list[tuple[bytes, bytes]], where: str
) -> None:
    with pytest.raises(Unauthorized, match=where):
        presented_key(request(target, *lines), AUTH, HEADER)
