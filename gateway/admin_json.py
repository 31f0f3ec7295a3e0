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
    repeated: list[_Repeated] = []
    try:
        data = json.loads(raw, object_pairs_hook=lambda pairs: _object(pairs, repeated))
    except RecursionError:
        raise BadRequest("body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer too long
        if not isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
            raise BadRequest("body: a number in it is too long") from None
        raise BadRequest(f"body: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRequest("body: must be a JSON object")
    if repeated:
        # Which of two values counts is every parser's own choice (the last, here), so a body
        # that says two things is a mistake to name, by its path as every other one is.
        field = f"{_path_to(data, repeated[0])}.{repeated[0].twice}".removeprefix(".")
        raise BadRequest(f"{field}: given twice")
    return data


class _Repeated(dict[str, Any]):
    """A JSON object in which the field `twice` came more than once."""

    twice = ""


def _object(pairs: list[tuple[str, Any]], repeated: list[_Repeated]) -> dict[str, Any]:
    """A JSON object as read; one with a field given twice is marked and noted in `repeated`
    (the reader, making objects innermost first, cannot know yet where it sits)."""
    found: dict[str, Any] = {}
    twice = None
    for name, value in pairs:
        if name in found and twice is None:
            twice = name
        found[name] = value
    if twice is None:
        return found
    marked = _Repeated(found)
    marked.twice = twice
    repeated.append(marked)
    return marked


def _path_to(data: dict[str, Any], target: dict[str, Any]) -> str:
    """Where `target` sits in `data`, as the config's paths say it (`.plans.soccer`, `[1]`);
    walked without recursion, as deep as the reader went."""
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:
        path, value = pending.pop()
        if value is target:
            return path
        if isinstance(value, dict):
            pending.extend((f"{path}.{name}", item) for name, item in value.items())
        elif isinstance(value, list):
            pending.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
    return ""


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
