"""The API key a request presents: in the key header, else in the key query parameter.

A request that presents two different keys is refused (401) rather than charged to one of them:
which one the client meant cannot be known, and a proxy or cache in front may have read the
other. The same key sent twice is one key.
"""

from __future__ import annotations

from gateway.config.model import AuthConfig
from gateway.http.headers import decode
from gateway.http.request import Request
from gateway.problems import Unauthorized


def presented_key(request: Request, auth: AuthConfig, key_header: bytes) -> str | None:
    """The key `request` presents, None when it presents none; raises Unauthorized when it
    presents different keys. `key_header` is `auth.header` lower-cased, as bytes."""
    from_header: bytes | None = None
    for name, value in request.raw_headers:
        if value and name.lower() == key_header:
            if from_header is None:
                from_header = value
            elif value != from_header:
                raise Unauthorized(f"The {auth.header} header was sent with different keys.")
    param = auth.query_param
    from_query: list[str] = []
    if param is not None and request.query_string:
        from_query = [value for value in request.query.getall(param, ()) if value]
        if len(set(from_query)) > 1:
            raise Unauthorized(f"The {param} query parameter was sent with different keys.")
    if from_header is None:
        return from_query[0] if from_query else None
    presented = decode(from_header)
    if from_query and from_query[0] != presented:
        raise Unauthorized(
            f"Different keys were sent in the {auth.header} header and the {param} query parameter."
        )
    return presented
