"""Step 2: the API key a request presents, in the key header, else in the key query parameter.

A request that presents two different keys is refused (401) rather than charged to one of them:
which one the client meant cannot be known, and a proxy or cache in front may have read the
other. Two secrets of one key (the old and the new during a rotation's grace) are one key, as
is the same secret sent twice.
"""

from __future__ import annotations

from gateway.config.model import ApiKey, AuthConfig
from gateway.http.headers import decode
from gateway.http.request import Request
from gateway.keys.index import KeyIndex
from gateway.problems import Unauthorized


def identify_presented(
    request: Request, auth: AuthConfig, key_header: bytes, keys: KeyIndex
) -> ApiKey:
    """The key `request` presents, or Unauthorized (none, unknown, expired, or two different
    keys). `key_header` is `auth.header` lower-cased, as bytes."""
    first: bytes | None = None  # the first key header line's value
    from_header: list[bytes] | None = None  # all its values, once there are different ones
    for name, value in request.raw_headers:
        if value and name.lower() == key_header:
            if first is None:
                first = value
            elif value != first:
                from_header = from_header or [first]
                if value not in from_header:
                    from_header.append(value)
    param = auth.query_param
    query = request.query_string
    # Names are compared decoded (as the parameter is removed before forwarding): one that
    # is spelt plainly or escaped; parsing the query costs more than the rest of this step.
    if param is None or not query or not (param in query or "%" in query or "+" in query):
        if from_header is None:  # the usual request: one key header line, or none
            return keys.identify(auth, None if first is None else decode(first))
        from_query: list[str] = []
    else:
        from_query = [value for value in request.query.getall(param, ()) if value]
    sent = from_header or ([first] if first is not None else [])
    presented = [decode(value) for value in sent] + from_query
    key = keys.identify(auth, presented[0] if presented else None)
    for other in set(presented[1:]):
        if other != presented[0] and not _same_key(keys, auth, other, key):
            if not from_query:
                where = f"the {auth.header} header"
            elif not sent:
                where = f"the {param} query parameter"
            else:
                where = f"the {auth.header} header and the {param} query parameter"
            raise Unauthorized(f"Different API keys were sent in {where}.")
    return key


def _same_key(keys: KeyIndex, auth: AuthConfig, secret: str, key: ApiKey) -> bool:
    try:
        return keys.identify(auth, secret).name == key.name
    except Unauthorized:
        return False  # unknown or expired: a different key all the same
