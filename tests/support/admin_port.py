"""What the admin port's tests share: a token, its header, and a config whose admin calls have a
key and a quota to work on."""

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
