"""The suite's event loop (tests/conftest.py): a connection a test leaves open fails that test at
its loop's close; it must not hang the whole run."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.conftest import LeakCheckingLoop


def test_a_connection_left_open_fails_the_test_instead_of_hanging_the_run() -> None:
    loop = LeakCheckingLoop()
    with socket.create_server(("127.0.0.1", 0)) as listener:

        async def leak() -> None:
            await loop.create_connection(asyncio.Protocol, *listener.getsockname()[:2])

        loop.run_until_complete(leak())
        with pytest.raises(AssertionError, match="left open when the test's event loop closed"):
            loop.close()
    assert loop.is_closed()


def test_a_loop_with_nothing_left_open_closes_quietly() -> None:
    loop = LeakCheckingLoop()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    assert loop.is_closed()
