"""The JSON body and the query parameters of an admin call, read the one way every admin
endpoint reads them: a mistake is a 400 whose detail starts with the field or parameter it is
about (`body` for the body as a whole), and one the endpoint does not know, or one given twice,
is a mistake, not something silently ignored."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import MatchInfoError, UrlMappingMatchInfo

from gateway.problems import BadRequest, RequestTimeout, UnsupportedMediaType


async def expect_continue(request: web.Request) -> None:
    """The admin port's answer to `Expect`, as the proxy port's: nothing yet. An HTTP/1.1
    `100-continue` gets its `100 Continue` when the call reads its body (`json_object`), so a
    call refused before (401, 404, 405, 413) never has its body sent: it was invited before any
    check, and a client without the token was asked for its megabyte. Any other expectation is
    ignored (RFC 9110 lets a server do so), where aiohttp's own handler answered a plain-text
    417 that no middleware sees. Every admin route takes it (`ADMIN_ROUTE`), and so do the
    router's 404 and 405 (`AdminRouter`)."""


def awaits_continue(request: web.Request) -> bool:
    """Whether the client waits for a `100 Continue` before it sends the body."""
    expected = request.headers.get("Expect", "").strip().lower()
    return expected == "100-continue" and request.version >= (1, 1)


async def _invite_body(request: web.Request) -> None:
    if awaits_continue(request) and not request.content.is_eof():
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own bytes have not begun


class _RefusedMatch(MatchInfoError):
    """The router's 404 or 405, taking `Expect` as the admin routes do."""

    @property
    def expect_handler(self) -> Callable[[web.Request], Awaitable[None]]:
        return expect_continue


class AdminRouter(web.UrlDispatcher):
    """The admin port's router: its own 404 and 405 (a path or a method it does not serve)
    answer `Expect` as the routes do, where aiohttp sent a `100 Continue` before them, or a
    plain-text 417 for another expectation."""

    async def resolve(self, request: web.Request) -> UrlMappingMatchInfo:
        found = await super().resolve(request)
        if isinstance(found, MatchInfoError):
            return _RefusedMatch(found.http_exception)
        return found


# Keyword arguments of every admin route (`app.router.add_get(path, handler, **ADMIN_ROUTE)`).
ADMIN_ROUTE: dict[str, Any] = {"expect_handler": expect_continue}

# The running config's `server.timeouts.client_body`: the most a body may take to arrive.
BODY_TIMEOUT: web.AppKey[Callable[[], float]] = web.AppKey("admin_body_timeout")


async def json_object(request: web.Request, *, required: bool) -> dict[str, Any]:
    """The body as a JSON object; an empty body is `{}` unless `required`."""
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        # The admin port does not decode bodies (aiohttp's auto_decompress is off): a body
        # that is not as it says failed inside aiohttp, with a 500 or a plain-text 400.
        raise UnsupportedMediaType(
            f"Content-Encoding: an admin call's body is taken as it is, not {coding!r}",
            headers={"Accept-Encoding": "identity"},
        )
    within = request.app[BODY_TIMEOUT]()
    try:
        async with asyncio.timeout(within):
            await _invite_body(request)
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(f"body: did not arrive within {within:g}s (client_body)") from None
    if not raw.strip():
        if not required:
            return {}
        # Said so, where json.loads told of a JSON value expected at line 1 column 1.
        raise BadRequest("body: is required, a JSON object")
    try:
        data = json.loads(raw, object_pairs_hook=_no_field_twice)
    except _FieldTwice as twice:
        raise BadRequest(f"{twice.name}: given twice") from None
    except RecursionError:
        raise BadRequest("body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer too long
        if not isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
            raise BadRequest("body: a number in it is too long") from None
        raise BadRequest(f"body: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRequest("body: must be a JSON object")
    return data


class _FieldTwice(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _no_field_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a field comes twice: which one counts is every parser's own
    choice (the last, here), so a body that says two things is a mistake to name."""
    found: dict[str, Any] = {}
    for name, value in pairs:
        if name in found:
            raise _FieldTwice(name)
        found[name] = value
    return found


def only_fields(data: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    """`data`, once every field in it is one of `allowed`."""
    for name in data:
        if name not in allowed:
            raise BadRequest(f"{name}: unknown field (allowed: {', '.join(allowed) or 'none'})")
    return data


def only_parameters(request: web.Request, allowed: tuple[str, ...]) -> None:
    """Refuses a query parameter that is not one of `allowed`, or is given twice: misspelt
    (`form=`), one was left out and the answer was that of its default (a billing export of
    another month), and of two the first counted."""
    seen: set[str] = set()
    for name, _value in request.query.items():  # every occurrence (keys() names each once)
        if name not in allowed:
            raise BadRequest(f"{name}: unknown parameter (allowed: {', '.join(allowed) or 'none'})")
        if name in seen:
            raise BadRequest(f"{name}: given twice")
        seen.add(name)
