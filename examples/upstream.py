"""The example upstream API that `make run` puts behind the gateway.

It answers every path with a small JSON document describing the request it received, so the
README's curl lines show what the gateway forwarded (and what it removed). A few paths behave
differently to demonstrate pass-through: `.../missing...` answers 404, `.../broken...` answers
503 (a failing upstream, for the README's refund example), a matching `If-None-Match` answers
304, `?sleep=SECONDS` waits before answering, and `?units=N` says in `X-Units-Used` that the
call cost N units and `?tokens=N` adds `"usage": {"total_tokens": N}` to the JSON document (for
the README's reported-cost example). A WebSocket upgrade
to `/base/soccer/v4/live/MATCH` is accepted: it sends one `kick-off` message, then echoes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json

from aiohttp import WSMsgType, web


async def answer(request: web.Request) -> web.StreamResponse:
    sleep = request.query.get("sleep")
    if sleep:
        await asyncio.sleep(min(float(sleep), 60.0))
    if "missing" in request.path:
        return web.json_response({"error": "no such thing upstream"}, status=404)
    if "broken" in request.path:
        return web.json_response({"error": "the upstream is failing"}, status=503)
    document: dict[str, object] = {
        "upstream": "example",
        "method": request.method,
        "path": request.path,
        "query": dict(request.query),
        "request_id": request.headers.get("X-Request-ID"),
        "x_forwarded_for": request.headers.get("X-Forwarded-For"),
        "saw_api_key_header": "X-API-Key" in request.headers,
    }
    tokens = request.query.get("tokens", "")
    if tokens.isdigit():  # what the call cost, for a route with a cost_field
        document["usage"] = {"total_tokens": int(tokens)}
    body = json.dumps(document, indent=2).encode() + b"\n"
    etag = '"' + hashlib.sha256(request.path.encode()).hexdigest()[:16] + '"'
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag})
    headers = {"ETag": etag}
    if "units" in request.query:  # what the call cost, for a route with a cost_header
        headers["X-Units-Used"] = request.query["units"]
    return web.Response(body=body, content_type="application/json", headers=headers)


async def live(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return await answer(request)
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str(f"kick-off {request.match_info['match_id']}")
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/base/soccer/v4/live/{match_id}", live)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    web.run_app(build_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
