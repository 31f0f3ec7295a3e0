"""Reading an upstream's `Keep-Alive: timeout=N` (the pool's use of it: tests/integration/proxy/
test_keep_alive_hint.py)."""

from __future__ import annotations

import pytest

from gateway.http.reply import keep_alive_timeout


@pytest.mark.parametrize(
    ("value", "timeout"),
    [
        (b"timeout=5", 5),
        (b"timeout=5, max=1000", 5),
        (b"max=1000, timeout=0", 0),
        (b" Timeout = 7 ", 7),
        (b"timeout=1,timeout=9", 1),
        (b"timeout=999999999", 999999999),
        (b"max=1000", None),
        (b"", None),
        (b"timeout", None),
        (b"timeout=", None),
        (b"timeout=abc", None),
        (b"timeout=-3", None),
        (b"timeout=+3", None),
        (b"timeout=5s", None),
        (b"timeout=2.5", None),
        (b'timeout="5"', None),
        (b"timeout=\xd9\xa5", None),  # an Arabic-Indic five: a digit to str.isdigit, not here
        (b"timeout=1000000000", None),
        (b"timeout=" + b"9" * 5000, None),
        (b"timeouts=5", None),
    ],
)
def test_keep_alive_timeout(value: bytes, timeout: int | None) -> None:
    assert keep_alive_timeout(value) == timeout
