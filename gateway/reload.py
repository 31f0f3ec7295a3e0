"""Picking up an edited config: a file watch and SIGHUP, validate first, then swap at once.

A config that fails validation is logged and counted and the running one stays. Watching is by
polling modification times: it needs no extra dependency, works on every filesystem a container
mounts, and half a second is well inside the contract's two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from gateway.config import ConfigError, load_config
from gateway.config.model import Config

log = logging.getLogger("gateway.reload")

POLL_INTERVAL = 0.5


def config_fingerprint(path: str) -> tuple[tuple[str, int, int], ...]:
    """What changes when the config is edited: each YAML file's name, mtime and size."""
    root = Path(path)
    files = sorted(root.glob("*.yaml")) if root.is_dir() else [root]
    fingerprint = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            continue
        fingerprint.append((str(file), stat.st_mtime_ns, stat.st_size))
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
        self._fingerprint = config_fingerprint(path)
        self._task: asyncio.Task[None] | None = None

    def reload(self) -> bool:
        self._fingerprint = config_fingerprint(self._path)
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

    def changed(self) -> bool:
        """Whether the files differ from what the last reload (or the start) read."""
        return config_fingerprint(self._path) != self._fingerprint

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
            if self.changed():
                # Editors write in several steps; let the last one land before reading.
                await asyncio.sleep(0.1)
                # A SIGHUP during that pause has read the edit already: one edit, one reload.
                if self.changed():
                    self.reload()
