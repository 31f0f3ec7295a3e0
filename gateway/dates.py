"""The Date header line, formatted once per second rather than once per answer."""

from __future__ import annotations

import time
from email.utils import formatdate


class _DateLine:
    """`Date: ...\\r\\n`, formatted once per second rather than once per answer."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def __call__(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._line = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
        return self._line


date_line = _DateLine()
