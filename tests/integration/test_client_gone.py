import asyncio
import logging
from pathlib import Path

import pytest

from tests.support.gateway import running_gateway, write_config
from tests.support.upstream import running_upstream

API = """
products:
  p:
    upstream: {{url: "{u}"}}
    routes: [{{path: "/{{rest:path}}"}}]
plans: {{open: {{}}}}
keys: [{{name: k, key: s, plans: {{p: open}}}}]
"""


async def test_client_leaving_mid_answer_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_upstream() as up:
        async with running_gateway(write_config(tmp_path / "c", API.format(u=up.url))) as gw:
            with caplog.at_level(logging.DEBUG):
                for _ in range(5):
                    r, w = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
                    w.write(b"GET /big?bytes=50000000 HTTP/1.1\r\nHost: t\r\nX-API-Key: s\r\n\r\n")
                    await w.drain()
                    await r.readexactly(100000)
                    w.transport.abort()
                    await asyncio.sleep(0.1)
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert errors == [], [rec.getMessage() for rec in errors]
