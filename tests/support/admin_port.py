"""What the admin port's tests share: a token, its header, a config whose admin calls have a
key and a quota to work on, and raw request heads."""

from __future__ import annotations

TOKEN = "admin-s3cret"

# A product with a quota and a key on it, its upstream never reached: for admin calls.
SHOP_WITH_QUOTA = """
products:
  shop:
    upstream: {url: "http://127.0.0.1:9"}
    routes: [{path: "/shop/{rest:path}"}]
plans:
  trial: {quota: {limit: 10, per: day}}
keys:
  - {name: acme, key: acme-secret, plans: {shop: trial}}
"""


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def head(method: str, path: str, *lines: str) -> bytes:
    """A request head: the request line, `Host` and `lines`."""
    request_line = f"{method} {path} HTTP/1.1"
    return "".join(f"{line}\r\n" for line in (request_line, "Host: x", *lines, "")).encode()
