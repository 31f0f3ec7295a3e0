"""Every answer the gateway makes itself, as one exception tree.

    GatewayProblem                      (status, title, code)
    ├── BadRequest                      400 Bad Request          bad_request
    │   └── PlainHttpToHttpsPort                                     plain_http_to_https_port
    ├── Unauthorized                    401 Unauthorized         unauthorized
    ├── Forbidden                       403 Forbidden            forbidden
    ├── InvalidRoute                    404 Invalid route        invalid_route
    ├── WrongIdentifier                 404 Wrong identifier     wrong_identifier
    ├── NotFound                        404 Not Found            not_found (admin API)
    ├── MethodNotAllowed                405 Method Not Allowed   method_not_allowed
    ├── Conflict                        409 Conflict             conflict (admin API)
    ├── RequestTimeout                  408 Request Timeout      request_timeout
    ├── Gone                            410 Gone                 gone
    ├── PreconditionFailed              412 Precondition Failed  precondition_failed (admin API)
    ├── ContentTooLarge                 413 Content Too Large    content_too_large (admin API)
    ├── QuotaExceeded                   429 Quota Exceeded       quota_exceeded
    ├── Throttled                       429 Throttled            throttled
    ├── InternalError                   500 Internal Server Error internal_error
    ├── BadGateway                      502 Bad Gateway          bad_gateway
    ├── ServiceUnavailable              503 Service Unavailable
    │   ├── Maintenance                                          maintenance
    │   └── StorageUnavailable                                   storage_unavailable
    └── GatewayTimeout                  504 Gateway Timeout      gateway_timeout

A step of the request path raises one; `render_problem` turns it into the headers and the
`application/problem+json` body (RFC 9457) of an answer, for the proxy port and the admin port
alike. The HTTP layer's own errors (`gateway.http.errors`) become problems in one table,
`problem_from_http_error`; storage errors become `StorageUnavailable` where the storage is
called. No third-party exception reaches a client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from gateway.http import errors as http_errors

PROBLEM_CONTENT_TYPE = "application/problem+json"

# 499 is never sent; it is only recorded when the client went away first.
CLIENT_CLOSED_STATUS = 499
CLIENT_CLOSED_CODE = "client_closed"


class GatewayProblem(Exception):
    status: int = 500
    title: str = "Internal Server Error"
    code: str = "internal_error"

    def __init__(
        self,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        close_connection: bool = False,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})
        self.close_connection = close_connection

    def body(self, request_id: str) -> bytes:
        return json.dumps(
            {
                "type": "about:blank",
                "title": self.title,
                "status": self.status,
                "code": self.code,
                "detail": self.detail,
                "request_id": request_id,
            },
            ensure_ascii=False,
            separators=(", ", ": "),
            # A detail may quote a client's text, lone surrogates and all (a JSON field name
            # like "\ud800"): written back as the same JSON escape, not an encoding error.
        ).encode("utf-8", "backslashreplace")


class BadRequest(GatewayProblem):
    status, title, code = 400, "Bad Request", "bad_request"


class PlainHttpToHttpsPort(BadRequest):
    code = "plain_http_to_https_port"


# RFC 9110, 15.5.2: a 401 carries a challenge. The scheme is Kong key-auth's; the admin port
# gives its own (Bearer).
_KEY_CHALLENGE = {"WWW-Authenticate": 'Key realm="gateway"'}


class Unauthorized(GatewayProblem):
    status, title, code = 401, "Unauthorized", "unauthorized"

    def __init__(
        self, detail: str, *, headers: Mapping[str, str] | None = None, key_name: str = ""
    ) -> None:
        super().__init__(detail, headers=_KEY_CHALLENGE if headers is None else headers)
        # The key the secret belongs to, when it is one the gateway knows but no longer takes
        # (expired, or replaced by a rotation): for the access log, whose reader is the
        # operator, not for the client.
        self.key_name = key_name


class Forbidden(GatewayProblem):
    status, title, code = 403, "Forbidden", "forbidden"


class InvalidRoute(GatewayProblem):
    status, title, code = 404, "Invalid route", "invalid_route"


class WrongIdentifier(GatewayProblem):
    status, title, code = 404, "Wrong identifier", "wrong_identifier"


class NotFound(GatewayProblem):
    """The admin API's: no such key, product or path."""

    status, title, code = 404, "Not Found", "not_found"


class MethodNotAllowed(GatewayProblem):
    status, title, code = 405, "Method Not Allowed", "method_not_allowed"

    def __init__(
        self, detail: str, *, headers: Mapping[str, str], product: str = "", route: str = ""
    ) -> None:
        super().__init__(detail, headers=headers)
        # The route whose path matched (its product and template), for metrics and the log.
        self.product = product
        self.route = route


class Conflict(GatewayProblem):
    """The admin API's: a name or secret is taken, or the key belongs to the config file."""

    status, title, code = 409, "Conflict", "conflict"


class RequestTimeout(GatewayProblem):
    status, title, code = 408, "Request Timeout", "request_timeout"

    def __init__(self, detail: str) -> None:
        # The rest of a slow request may still be on its way: the connection cannot be reused.
        super().__init__(detail, close_connection=True)


class Gone(GatewayProblem):
    status, title, code = 410, "Gone", "gone"


class PreconditionFailed(GatewayProblem):
    """The admin API's: a key is no longer as the caller's `If-Match` says it read it."""

    status, title, code = 412, "Precondition Failed", "precondition_failed"


class ContentTooLarge(GatewayProblem):
    """The admin API's: a body over the size an admin call may have."""

    status, title, code = 413, "Content Too Large", "content_too_large"


class UnsupportedMediaType(GatewayProblem):
    """The admin API's: a body in a content coding it does not take."""

    status, title, code = 415, "Unsupported Media Type", "unsupported_media_type"


class QuotaExceeded(GatewayProblem):
    status, title, code = 429, "Quota Exceeded", "quota_exceeded"


class Throttled(GatewayProblem):
    status, title, code = 429, "Throttled", "throttled"


class InternalError(GatewayProblem):
    status, title, code = 500, "Internal Server Error", "internal_error"


class BadGateway(GatewayProblem):
    status, title, code = 502, "Bad Gateway", "bad_gateway"


class ServiceUnavailable(GatewayProblem):
    status, title = 503, "Service Unavailable"


class Maintenance(ServiceUnavailable):
    code = "maintenance"


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "The rate-limit storage is not answering; try again shortly.",
            headers={"Retry-After": "1"},
        )


class GatewayTimeout(GatewayProblem):
    status, title, code = 504, "Gateway Timeout", "gateway_timeout"


# Every answer of the gateway's says which request it answers (README, "Headers").
REQUEST_ID_HEADER = "X-Request-ID"


def render_problem(
    problem: GatewayProblem, request_id: str, headers: Mapping[str, str] | None = None
) -> tuple[dict[str, str], bytes]:
    """The headers and the body of the answer that tells `problem`: `headers` (the request's
    own so far, such as its limit headers), the problem's, the content type and the id."""
    merged = {**headers} if headers else {}
    merged.update(problem.headers)
    merged["Content-Type"] = PROBLEM_CONTENT_TYPE
    merged[REQUEST_ID_HEADER] = request_id
    return merged, problem.body(request_id)


# What each error of the HTTP layer means to the gateway's users, most specific first;
# `{what}` is the upstream's product, `{reason}` the error's own words, `{error}` the error.
_HTTP_ERROR_PROBLEMS: tuple[tuple[type[http_errors.HttpError], type[GatewayProblem], str], ...] = (
    (http_errors.MalformedRequest, BadRequest, "The request is {reason}."),
    (
        http_errors.PlainHttpOnTlsPort,
        PlainHttpToHttpsPort,
        "The plain HTTP request was sent to the HTTPS port: use https:// to reach it.",
    ),
    (http_errors.HeadTimeout, RequestTimeout, "The request head did not arrive in time."),
    (
        http_errors.BodyTimeout,
        RequestTimeout,
        "The request body stalled for more than {error.seconds:g}s.",
    ),
    (http_errors.ConnectTimeout, GatewayTimeout, "The upstream of {what} failed: {reason}."),
    (http_errors.ResponseTimeout, GatewayTimeout, "The upstream of {what} {reason}."),
    (http_errors.RequestBodyFailed, BadGateway, "The request body could not be read."),
    (http_errors.ResponseBodyError, BadGateway, "The upstream of {what} {reason}."),
    (http_errors.UpstreamError, BadGateway, "The upstream of {what} failed: {reason}."),
    (http_errors.HttpError, BadGateway, "The HTTP exchange failed: {reason}."),
)


def problem_from_http_error(error: http_errors.HttpError, product: str = "") -> GatewayProblem:
    """The answer for an error of the HTTP layer: 400, 408, 502 or 504."""
    for error_type, problem_type, template in _HTTP_ERROR_PROBLEMS:
        if isinstance(error, error_type):
            detail = template.format(what=product or "this route", reason=error, error=error)
            if issubclass(problem_type, BadRequest):
                # The rest of a request that is not HTTP (or not TLS) cannot be read: the
                # connection ends.
                return problem_type(detail, close_connection=True)
            return problem_type(detail)
    raise AssertionError("HttpError is the last row")  # pragma: no cover
