"""The admin port's server as aiohttp makes it, remade so that aiohttp's own refusals are
problems; and, should an aiohttp upgrade change the private parts that remaking reads, left as
aiohttp made it rather than failing the gateway's start."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web

from gateway.admin_http import _AdminServer, admin_server


async def _handler(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response()


async def test_aiohttps_server_is_remade_as_the_admin_ports() -> None:
    made = web.Server(_handler, handler_cancellation=True)
    remade = admin_server(made)
    assert isinstance(remade, _AdminServer)
    assert remade.request_handler is _handler and remade.handler_cancellation


async def test_a_server_of_another_shape_is_kept_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    made = web.Server(_handler)
    del made._kwargs  # what a later aiohttp might no longer have
    with caplog.at_level(logging.WARNING, logger="gateway.admin"):
        assert admin_server(made) is made
    assert "is not as expected" in caplog.text
