"""The key a request presents (gateway/auth.py): where it is read, and two refused."""

from __future__ import annotations

import hashlib
import time
from types import SimpleNamespace
from typing import cast

import pytest

from gateway.auth import identify_presented
from gateway.config.model import ApiKey, AuthConfig, Plan
from gateway.http.request import NO_BODY, Request
from gateway.http.server_connection import ServerConnection
from gateway.keys import ApiKeyTable, KeyIndex, KeyRecord
from gateway.keys.records import PreviousSecret
from gateway.problems import Unauthorized

AUTH = AuthConfig()
HEADER = b"x-api-key"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def key_index() -> KeyIndex:
    """File keys alpha ("a") and beta ("b"); API key "rotated", whose old secret is still
    accepted for an hour after the new one replaced it."""
    plans = {"trial": Plan("trial")}
    table = ApiKeyTable()
    previous = (PreviousSecret(digest("old"), time.time() + 3600),)
    table.put(KeyRecord("rotated", digest("new"), {"soccer": "trial"}, previous=previous))
    table.loaded = True
    files = [ApiKey(name, digest(name[0]), {"soccer": "trial"}) for name in ("alpha", "beta")]
    files.append(ApiKey("odd", digest("secr\udce9t"), {"soccer": "trial"}))
    return KeyIndex(files, plans, table)


def identify(target: bytes, *lines: tuple[bytes, bytes], auth: AuthConfig = AUTH) -> str:
    # Only its peer and scheme are read from the connection while the request is made.
    connection = cast(ServerConnection, SimpleNamespace(remote="127.0.0.1", scheme="http"))
    request = Request(connection, "GET", target, list(lines), "1.1", True, NO_BODY)
    return identify_presented(request, auth, HEADER, key_index()).name


@pytest.mark.parametrize(
    ("target", "lines", "name"),
    [
        (b"/x", [(b"X-API-Key", b"a")], "alpha"),
        (b"/x", [(b"x-api-KEY", b"a"), (b"X-Api-Key", b"a")], "alpha"),
        (b"/x?api_key=b", [], "beta"),
        (b"/x?api%5Fkey=b", [], "beta"),  # names are compared decoded, as they are removed
        (b"/x?api_key=b", [(b"X-API-Key", b"")], "beta"),  # an empty key is none
        (b"/x?api_key=&api_key=b", [], "beta"),
        (b"/x?api_key=a", [(b"X-API-Key", b"a")], "alpha"),
        (b"/x?other=1", [(b"X-API-Key", b"a")], "alpha"),
        (b"/x", [(b"X-API-Key", b"secr\xe9t")], "odd"),  # the bytes sent are what is hashed
        # Two secrets of one key, during its rotation's grace: one key.
        (b"/x?api_key=new", [(b"X-API-Key", b"old")], "rotated"),
        (b"/x", [(b"X-API-Key", b"new"), (b"X-API-Key", b"old")], "rotated"),
    ],
)
def test_the_key_presented(target: bytes, lines: list[tuple[bytes, bytes]], name: str) -> None:
    assert identify(target, *lines) == name


@pytest.mark.parametrize(
    ("target", "lines", "detail"),
    [
        (b"/x", [], "An API key is required"),
        (b"/x?api_key=a", [], "An API key is required"),
        (b"/x", [(b"X-API-Key", b"zzz")], "not valid"),
    ],
)
def test_no_known_key(target: bytes, lines: list[tuple[bytes, bytes]], detail: str) -> None:
    auth = AUTH if target == b"/x" else AuthConfig(query_param=None)
    with pytest.raises(Unauthorized, match=detail):
        identify(target, *lines, auth=auth)


@pytest.mark.parametrize(
    ("target", "lines", "where"),
    [
        (b"/x", [(b"X-API-Key", b"a"), (b"x-api-key", b"b")], "in the X-API-Key header"),
        (b"/x", [(b"X-API-Key", b"a"), (b"x-api-key", b"zzz")], "in the X-API-Key header"),
        (b"/x?api_key=a&api%5Fkey=b", [], "in the api_key query parameter"),
        (
            b"/x?api_key=b",
            [(b"X-API-Key", b"a")],
            "in the X-API-Key header and the api_key query parameter",
        ),
        (
            b"/x?api_key=old",
            [(b"X-API-Key", b"a")],
            "in the X-API-Key header and the api_key query parameter",
        ),
    ],
)
def test_two_different_keys_are_refused(
    target: bytes, lines: list[tuple[bytes, bytes]], where: str
) -> None:
    with pytest.raises(Unauthorized, match=f"Different API keys were sent {where}"):
        identify(target, *lines)
