"""Picking up an edited config: a file watch and SIGHUP, validate first, then swap at once.

A config that fails validation is logged and counted and the running one stays. Watching is by
polling modification times (`Reloader.poll`, called by a worker's own task or by the
supervisor's loop): it needs no extra dependency, works on every filesystem a container mounts,
and an edit is loaded within two polls, well inside the two seconds the README promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from gateway.config import ConfigError, load_config
from gateway.config.loader import config_files
from gateway.config.model import Config

log = logging.getLogger("gateway.reload")

POLL_INTERVAL = 0.5


Fingerprint = tuple[tuple[str, int, int], ...]


def config_fingerprint(path: str) -> Fingerprint:
    """What changes when the config is edited: each config file's name, mtime and size."""
    fingerprint = []
    for file in config_files(Path(path)):
        try:
            stat = os.stat(file)
        except OSError:
            continue
        fingerprint.append((file, stat.st_mtime_ns, stat.st_size))
    return tuple(fingerprint)


class Reloader:
    """Loads `path` again when asked or when it changes, and hands a good config to `apply`."""

    def __init__(
        self,
        path: str,
        apply: Callable[[Config], None],
        *,
        count: Callable[[bool], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self._path = path
        self._apply = apply
        self._count = count
        self._env = env
        self._fingerprint = config_fingerprint(path)  # of what was loaded last
        self._seen = self._fingerprint  # at the last poll
        self._task: asyncio.Task[None] | None = None

    def reload(self) -> bool:
        self._fingerprint = self._seen = config_fingerprint(self._path)
        try:
            config = load_config(self._path, env=self._env if self._env is not None else os.environ)
        except ConfigError as exc:
            for issue in exc.issues:
                log.error("config reload rejected, keeping the running config: %s", issue)
            if self._count is not None:
                self._count(False)
            return False
        self._apply(config)
        if self._count is not None:
            self._count(True)
        log.info("config reloaded from %s", self._path)
        return True

    def poll(self) -> bool:
        """Reload if the files changed since the last load and have stayed as they are since
        the previous poll (editors write in several steps; one edit, one reload). A SIGHUP
        reload in between updates the fingerprint, so its edit is not loaded twice."""
        current = config_fingerprint(self._path)
        if current == self._fingerprint:
            self._seen = current
            return False
        if current != self._seen:
            self._seen = current  # still being written, perhaps: look again next time
            return False
        return self.reload()

    def start_watching(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            self.poll()
