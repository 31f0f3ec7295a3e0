"""Every answer the gateway makes itself, as one exception tree.

    GatewayProblem                      (status, title, code)
    ├── BadRequest                      400 Bad Request          bad_request
    ├── Unauthorized                    401 Unauthorized         unauthorized
    ├── Forbidden                       403 Forbidden            forbidden
    ├── InvalidRoute                    404 Invalid route        invalid_route
    ├── WrongIdentifier                 404 Wrong identifier     wrong_identifier
    ├── MethodNotAllowed                405 Method Not Allowed   method_not_allowed
    ├── RequestTimeout                  408 Request Timeout      request_timeout
    ├── Gone                            410 Gone                 gone
    ├── QuotaExceeded                   429 Quota Exceeded       quota_exceeded
    ├── Throttled                       429 Throttled            throttled
    ├── InternalError                   500 Internal Server Error internal_error
    ├── BadGateway                      502 Bad Gateway          bad_gateway
    ├── ServiceUnavailable              503 Service Unavailable
    │   ├── Maintenance                                          maintenance
    │   └── StorageUnavailable                                   storage_unavailable
    └── GatewayTimeout                  504 Gateway Timeout      gateway_timeout

A step of the request path raises one; the pipeline turns it into an
`application/problem+json` body (RFC 9457). Errors of aiohttp or redis-py are translated
into these at the edge where they happen (`raise BadGateway(...) from exc`), so no
third-party exception reaches the client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

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
        ).encode()


class BadRequest(GatewayProblem):
    status, title, code = 400, "Bad Request", "bad_request"


class Unauthorized(GatewayProblem):
    status, title, code = 401, "Unauthorized", "unauthorized"


class Forbidden(GatewayProblem):
    status, title, code = 403, "Forbidden", "forbidden"


class InvalidRoute(GatewayProblem):
    status, title, code = 404, "Invalid route", "invalid_route"


class WrongIdentifier(GatewayProblem):
    status, title, code = 404, "Wrong identifier", "wrong_identifier"


class MethodNotAllowed(GatewayProblem):
    status, title, code = 405, "Method Not Allowed", "method_not_allowed"


class RequestTimeout(GatewayProblem):
    status, title, code = 408, "Request Timeout", "request_timeout"

    def __init__(self, detail: str) -> None:
        # The rest of a slow request may still be on its way: the connection cannot be reused.
        super().__init__(detail, close_connection=True)


class Gone(GatewayProblem):
    status, title, code = 410, "Gone", "gone"


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


class GatewayTimeout(GatewayProblem):
    status, title, code = 504, "Gateway Timeout", "gateway_timeout"
