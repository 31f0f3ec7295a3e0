"""HTTP/1.1 for the gateway, both ways, at the level of asyncio protocols and httptools.

The server side (`server`, `server_connection`, `head_reading`, `answer`, `request`) accepts
clients on the proxy port; the client side (`client`, `client_connection`, `reply_reader`,
`reply`) keeps pools of connections to upstreams; `flow`, `wire` and `headers` are shared, and
`errors` is the one tree of transport errors.
This package knows HTTP only: nothing of products, plans, problems, metrics or the access log.
"""
