"""Picking up an edited config: a file watch and SIGHUP, validate first, then swap at once.

The config is read and validated off the event loop (in a child process for a big config;
`gateway.config.isolated` says why), so a worker goes on answering requests with the running
config meanwhile; applying the new one is a swap. A config that fails validation is logged and
counted and the running one stays. Watching is by polling modification times (`Reloader.poll`,
called by a worker's own task or by the supervisor's loop): it needs no extra dependency, works
on every filesystem a container mounts, and an edit is seen within two polls, which leaves most
of the two seconds the README promises to reading a big config.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from gateway.config import ConfigError
from gateway.config.files import config_files
from gateway.config.isolated import (
    config_from_answer,
    load_answer_file_off_loop,
    load_config_off_loop,
    read_config_isolated,
    save_answer,
)
from gateway.config.loader import collector_paused
from gateway.config.model import Config, ServerConfig, StorageConfig, Timeouts
from gateway.tasks import STEP_TIMEOUT, stop_tasks

log = logging.getLogger("gateway.reload")

POLL_INTERVAL = 0.25


Fingerprint = tuple[tuple[str, int, int, int, int], ...]


def config_fingerprint(path: str) -> Fingerprint:
    """What changes when the config is edited: each config file's name, mtime and size, and
    which file it is (device and inode, through symlinks): a symlink turned to another file
    of the same size and mtime (`cp -p`, `rsync -a`, a deploy tool's releases) is a change."""
    try:
        files = config_files(Path(path))
    except OSError as exc:
        # The folder cannot be listed (renamed away for a moment, no descriptor left): a state
        # of its own, so that the reload that follows says why, and the watch goes on.
        return ((path, -1, -1, -1, exc.errno or 0),)
    fingerprint = []
    for file in files:
        try:
            stat = os.stat(file)
        except OSError:
            continue
        fingerprint.append((file, stat.st_mtime_ns, stat.st_size, stat.st_dev, stat.st_ino))
    return tuple(fingerprint)


def collect_before_reload() -> None:
    """Free the cyclic garbage made since the last reload, before the next one freezes what is
    alive (`freeze_long_lived`). Cycles come from libraries the gateway does not control (an
    aiohttp route answering an unknown admin path refers to itself; a traceback kept with an
    error), and between two reloads they reach the oldest generation, which the collector
    rarely walks: frozen, each stayed for good. Done before the new config arrives, this
    walks only what is not frozen already (the old config is): the connections and requests of
    the moment and the caches.
    """
    started = time.perf_counter()
    found = gc.collect()
    log.debug(
        "collected %d objects before the reload in %.1f ms",
        found,
        (time.perf_counter() - started) * 1000,
    )


def freeze_long_lived() -> None:
    """Leave what is alive now (the config, its snapshot) out of future full collections.

    A config is built once and lives until the next reload, and it holds no reference
    cycles, so reference counting frees it when it is replaced; the cyclic collector has
    nothing to find in it, yet a full collection walks all of it. No collection right before:
    it would walk the new config just the same (200-330 ms for 100,000 keys); the garbage of
    the time between reloads went before the new config came (`collect_before_reload`), and
    what little was made since stays frozen. That is why a request must leave no
    cycle that holds it (and through it the config it was served with): one made during a
    reload would keep that old config alive for good (tested in test_statuses_leaks.py).
    """
    gc.freeze()


class Reloader:
    """Loads `path` again when asked or when it changes, and hands a good config to `apply`."""

    def __init__(
        self,
        path: str,
        apply: Callable[[Config], None],
        *,
        count: Callable[[bool], None] | None = None,
        env: dict[str, str] | None = None,
        hand_over_in: str | None = None,
        handed_over_in: str | None = None,
        prepare: Callable[[Config], Awaitable[Callable[[], None]]] | None = None,
        while_reading: Callable[[], None] | None = None,
    ) -> None:
        """`hand_over_in`: a supervisor saves each good config there for its workers before
        it signals them; `handed_over_in`: a supervised worker reads its config from there
        rather than parsing the files again (one parse per reload, not one per process).
        `prepare`: off the event loop, does the work of applying a config that can be done
        beforehand and returns the swap that is left; without it, `apply` is called.
        `while_reading`: what the supervisor does while `reload` waits for the files to be read
        (see `read_config_isolated`'s `while_waiting`)."""
        self._path = path
        self._apply = apply
        self._count = count
        self._env = env
        self._hand_over_in = hand_over_in
        self._handed_over_in = handed_over_in
        self._prepare = prepare
        self._while_reading = while_reading
        self._fingerprint = config_fingerprint(path)  # of what was loaded last
        self._seen = self._fingerprint  # at the last poll
        self._task: asyncio.Task[None] | None = None
        self._reloading: asyncio.Task[None] | None = None  # see `request_reload`
        self._asked_again = False
        self._one_at_a_time = asyncio.Lock()

    def reload(self) -> bool:
        """Load and apply now, waiting for it: for the supervisor, which serves no requests."""
        self._fingerprint = self._seen = config_fingerprint(self._path)
        try:
            answer, config = read_config_isolated(
                self._path, env=self._environment(), while_waiting=self._while_reading
            )
        except ConfigError as exc:
            return self._rejected(exc)
        except Exception:
            return self._failed()
        if self._hand_over_in is not None:
            save_answer(answer, self._hand_over_in)
        return self._accepted(config)

    async def reload_off_loop(self) -> bool:
        """Load without holding up the event loop, then apply; one reload at a time, in the
        order they were asked for (a later one may have been asked for a later edit)."""
        # No cyclic collection while a config is unpickled and indexed, then its survivors
        # frozen (`freeze_long_lived`): a new config is a hundred thousand objects for 10,000
        # keys, and without this their arrival sets off a full collection, which walks the
        # whole heap on whichever thread allocates next, the event loop's as likely as not
        # (measured: 15-30 ms with 10,000 keys, growing with the number of keys).
        async with self._one_at_a_time:
            collect_before_reload()
            with collector_paused(then_freeze=True):
                self._fingerprint = self._seen = config_fingerprint(self._path)
                try:
                    if self._handed_over_in is not None:
                        config = await load_answer_file_off_loop(self._handed_over_in)
                    else:
                        config = await load_config_off_loop(self._path, env=self._environment())
                    if self._prepare is None:
                        return self._accepted(config)
                    swap = await self._prepare(config)
                    return self._accepted(config, swap)
                except ConfigError as exc:
                    return self._rejected(exc)
                except Exception:
                    # A bug of ours, in loading or in making the snapshot of a config that
                    # passed its checks: counted and logged as a failed reload (the snapshot's
                    # ended the reload's task with a traceback nobody read, uncounted).
                    return self._failed()

    def request_reload(self) -> None:
        """Start a reload in the background (a SIGHUP handler cannot wait for one). Asked for
        while one is under way, however many times, it is one more load after that one, which
        reads the files as they are then: a deploy that writes several files and signals after
        each queued a whole load per signal (five of 8 s each with 100,000 keys, the last edit
        served 40 s late), where the last of them alone has anything left to read."""
        self._asked_again = True
        if self._reloading is None or self._reloading.done():
            loop = asyncio.get_running_loop()
            self._reloading = loop.create_task(self._reload_while_asked())

    async def _reload_while_asked(self) -> None:
        while self._asked_again:
            self._asked_again = False
            await self.reload_off_loop()

    def _environment(self) -> Mapping[str, str]:
        return self._env if self._env is not None else os.environ

    def _rejected(self, exc: ConfigError) -> bool:
        for issue in exc.issues:
            log.error("config reload rejected, keeping the running config: %s", issue)
        if self._count is not None:
            self._count(False)
        return False

    def _failed(self) -> bool:
        # A bug of the loader's, not of the config: the running config stays all the same, and
        # the watch goes on (a reload that raised used to end it without a word).
        log.exception("config reload failed, keeping the running config")
        if self._count is not None:
            self._count(False)
        return False

    def _accepted(self, config: Config, swap: Callable[[], None] | None = None) -> bool:
        if swap is None:
            self._apply(config)
        else:
            swap()
        if self._count is not None:
            self._count(True)
        log.info("config reloaded from %s", self._path)
        return True

    def poll(self) -> bool:
        """Reload (waiting for it) if the files changed and have settled; see `settled_edit`."""
        return self.settled_edit() and self.reload()

    def settled_edit(self) -> bool:
        """Whether the files changed since the last load and have stayed as they are since
        the previous poll (editors write in several steps; one edit, one reload). A SIGHUP
        reload in between updates the fingerprint, so its edit is not loaded twice."""
        current = config_fingerprint(self._path)
        if current == self._fingerprint:
            self._seen = current
            return False
        if current != self._seen:
            self._seen = current  # still being written, perhaps: look again next time
            return False
        return True

    def start_watching(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        await stop_tasks([self._reloading, self._task], STEP_TIMEOUT, "a config reload")
        self._task = self._reloading = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                # Asked, not awaited: an edit seen while a reload is under way (a SIGHUP's, or
                # one of the watch's own) joins whatever else is asked meanwhile, for one load.
                if self.settled_edit():
                    self.request_reload()
            except Exception:
                # A watch that ended here would leave every later edit unread, in silence.
                log.exception("watching the config failed; watching on")


# What a reload cannot change in a running process: sockets, processes and the clients of the
# storage are made once, at the start. `keep_restart_only` is the one list of what a reload
# swaps (products, routes, plans, keys, auth, client_body, websocket_idle, on_error,
# local_fraction, a renewed certificate); the rest stays as the process started with it.


class StartingConfig:
    """The config a process starts with, handed down the calls that start it (serve, the
    supervisor, a worker) in this box rather than held by each of their frames, which last as
    long as the process: the worker takes it out (`take`), and once a reload has replaced it
    nothing keeps it, nor its keys, alive. Held by the frames, it kept a second set of keys in
    every process after the first reload (100,000 file keys: 156 MB grew to 243 MB). What a
    restart alone changes is kept from it without its keys (`restart_only`)."""

    __slots__ = ("_answer", "_config", "_saved")

    def __init__(self, config: Config | None, answer: bytes = b"") -> None:
        self._config = config
        self._answer = answer  # the config as the child that read it sent it (pickled)
        self._saved: tuple[str, Config] | None = None  # see `saved`

    @classmethod
    def saved(cls, path: str, running: Config) -> StartingConfig:
        """The config saved in `path` (`save_answer`), read when it is first wanted, with what
        only a restart applies taken from `running` (`keep_restart_only`). A supervisor hands
        this to the workers it starts after a reload rather than the reloaded config itself:
        held for such a start, 100,000 file keys grew the supervisor from 77 to 118 MiB at
        the first reload, for a worker that may never need starting."""
        starting = cls(None)
        starting._saved = (path, running)
        return starting

    def peek(self) -> Config:
        if self._config is None and self._saved is not None:
            (path, running), self._saved = self._saved, None
            # The supervisor told the load's warnings when it read the files.
            self._config = keep_restart_only(
                running, config_from_answer(Path(path).read_bytes(), tell=False)
            )
        if self._config is None:
            raise RuntimeError("the starting config was taken already")
        return self._config

    def take(self) -> Config:
        config = self.peek()
        self._config = None
        return config

    def take_answer(self) -> bytes:
        answer, self._answer = self._answer, b""
        return answer


def restart_only(config: Config) -> Config:
    """What `keep_restart_only` reads of the config a process started with, to be held for the
    process's life: the config without its keys, which are most of a big config's memory."""
    return dataclasses.replace(config, keys=())


def keep_restart_only(running: Config, reloaded: Config) -> Config:
    """`reloaded` with what only a restart applies taken from `running`, the config the process
    started with: every part of the process then agrees on one storage, one set of addresses
    and timeouts, a worker restarted after the reload included."""
    server, started = reloaded.server, running.server
    # A renewed certificate is taken; TLS switched on or off is not.
    tls = server.tls if (server.tls is None) == (started.tls is None) else started.tls
    timeouts = dataclasses.replace(
        started.timeouts,
        client_body=server.timeouts.client_body,
        websocket_idle=server.timeouts.websocket_idle,
    )
    storage = dataclasses.replace(
        running.storage,
        on_error=reloaded.storage.on_error,
        local_fraction=reloaded.storage.local_fraction,
    )
    return dataclasses.replace(
        reloaded,
        server=dataclasses.replace(started, timeouts=timeouts, tls=tls),
        storage=storage,
    )


def warn_of_restart_only_changes(running: Config, reloaded: Config) -> None:
    """Log the settings a reload changed in the files but not in the process (those
    `keep_restart_only` kept): the reload is accepted, and an operator must not take those for
    applied."""
    kept = keep_restart_only(running, reloaded)
    changed = [
        *_differences("server", kept.server, reloaded.server),
        *_differences("storage", kept.storage, reloaded.storage),
    ]
    if changed:
        log.warning(
            "config reloaded, but %s only change%s at the next start",
            ", ".join(changed),
            "s" if len(changed) == 1 else "",
        )


# What `_differences` looks into; anything else is one setting.
_SECTIONS = (ServerConfig, StorageConfig, Timeouts)


def _differences(path: str, ours: object, theirs: object) -> list[str]:
    """The dotted paths of the settings in which two configs' sections differ (an address, a
    TLS config, is one setting)."""
    if ours == theirs:
        return []
    if type(ours) is not type(theirs) or not isinstance(ours, _SECTIONS):
        return [path]
    return [
        changed
        for field in dataclasses.fields(ours)
        for changed in _differences(
            f"{path}.{field.name}", getattr(ours, field.name), getattr(theirs, field.name)
        )
    ]
