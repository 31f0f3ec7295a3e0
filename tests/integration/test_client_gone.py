"""A client that hangs up mid-answer is a 499, not an error of the gateway's."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from tests.support.config import worker_server_yaml, write_config
from tests.support.gateway import running_gateway
from tests.support.upstream import running_upstream

API = """
products:
  p:
    upstream: {{url: "{upstream}"}}
    routes: [{{path: "/{{rest:path}}"}}]
plans: {{open: {{}}}}
keys: [{{name: k, key: s, plans: {{p: open}}}}]
"""


async def test_client_leaving_mid_answer_logs_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_upstream() as upstream:
        config = write_config(
            tmp_path / "c", API.format(upstream=upstream.url), server=worker_server_yaml()
        )
        async with running_gateway(config) as gateway:
            with caplog.at_level(logging.DEBUG):
                for _ in range(5):
                    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
                    writer.write(
                        b"GET /big?bytes=50000000 HTTP/1.1\r\nHost: t\r\nX-API-Key: s\r\n\r\n"
                    )
                    await writer.drain()
                    await reader.readexactly(100_000)
                    writer.transport.abort()
                    await asyncio.sleep(0.1)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    cut = [line for line in lines if line["status"] == 499]
    assert len(cut) == 5
    for line in cut:
        # How far the answer got: its upstream had answered, and its bytes were under way.
        assert line["upstream_ms"] is not None
        assert line["bytes_sent"] >= 50_000
