"""Processes, sockets and signals.

    gateway run
    └── supervisor (workers > 1): forks N workers, restarts a crashed one, forwards SIGHUP and
        │                         SIGTERM, watches the config and counts reloads
        └── worker: uvloop, its own SO_REUSEPORT sockets on the proxy and admin ports, the
                    proxy and admin apps, graceful drain on SIGTERM, reload on SIGHUP

With one worker the supervisor is skipped and the single process does everything. The
supervisor's own loop is `gateway.supervisor`; this module starts it, and is the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway import accesslog, listen_claim
from gateway.config import ConfigError
from gateway.config.isolated import read_config_isolated
from gateway.config.loader import collector_paused
from gateway.config.model import Address, Config
from gateway.open_files import raise_open_files_limit
from gateway.reload import (
    Reloader,
    StartingConfig,
    freeze_long_lived,
    keep_restart_only,
    restart_only,
    warn_of_restart_only_changes,
)
from gateway.supervisor import FORWARDED_SIGNALS, supervise
from gateway.tasks import finish_within, stop_tasks

if TYPE_CHECKING:
    from gateway.http.server import HttpServer
    from gateway.keys import KeyIndex

log = logging.getLogger("gateway.server")

# After the drain (in-flight requests: server.drain_timeout), closing a worker (its storage,
# upstream and admin connections, the tasks left at its exit) takes this long at most: a step
# that takes longer is named in a warning and left behind, so that the process always exits.
CLOSE_TIMEOUT = 5.0
# What a step still gets when the closing has used up its time.
_LAST_STEP = 0.1


# Connections the kernel completes and queues for a worker before it accepts them: a burst of
# new clients beyond it has its handshakes dropped and retried a second or more later. uvloop's
# create_server listens again with its own backlog (100), so it is given this one too.
LISTEN_BACKLOG = 1024


def open_listener(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Every worker binds its own socket to the same port; the kernel spreads connections.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address.host, address.port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def listen_addresses(config: Config) -> tuple[tuple[str, Address], ...]:
    """The addresses the gateway listens on, each with the setting that names it."""
    return (
        ("server.listen", config.server.listen),
        ("server.admin_listen", config.server.admin_listen),
    )


def taken_address(config: Config) -> str | None:
    """Why this gateway cannot listen where its config says (None: it can).

    Workers bind with SO_REUSEPORT to share their ports, and that alone would let a second,
    unrelated gateway started on the same ports join a running one without a word, each then
    answering part of the traffic with its own config (and, with memory://, its own limits).
    A socket bound without SO_REUSEPORT cannot share a port with any listener: one such bind,
    closed at once, tells whether anything, a gateway or another program, listens there now.
    """
    for name, address in listen_addresses(config):
        if address.port == 0:
            continue  # any free port: nothing to collide with
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address.host, address.port))
            except OSError as exc:
                reason = exc.strerror or str(exc)
                return f"{name}: cannot listen on {address}: {reason}"
    return None


def serve(config_path: str, metrics_in: str | None = None) -> int:
    """Run the gateway until it has drained; its exit code. `metrics_in`: the folder in which
    to make the workers' metrics folder (default: the system's temporary folder)."""
    # Held from the start until the handlers that act on them are in place (the supervisor's,
    # or a single worker's once it serves): a SIGTERM while the config is read or the keys
    # load is then a stop with exit 0, and a SIGHUP a reload, where the default actions
    # killed the process (143, 129), and where a container's pid 1 dropped them unseen.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        raise_open_files_limit()  # before the workers fork: they inherit it
        return _serve(config_path, metrics_in)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _serve(config_path: str, metrics_in: str | None) -> int:
    try:
        # In a child process: the parse's memory leaves with it, and the workers forked from
        # this process share only the result. Unpickled without the cyclic collector, which
        # would walk the new keys again and again as they arrive, for nothing (no cycles).
        with collector_paused():
            answer, config = read_config_isolated(config_path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    # From here on the config goes on in its box only: this frame lasts as long as the process.
    starting = StartingConfig(config, answer)
    del config, answer
    try:
        addresses = listen_addresses(starting.peek())
        taken = listen_claim.claim(addresses) or taken_address(starting.peek())
        if taken is not None:
            print(f"{config_path}: {taken}", file=sys.stderr)
            return 1
        return _serve_claimed(config_path, starting, metrics_in)
    finally:
        listen_claim.release()  # given up at the drain already; here on every other way out


def _serve_claimed(config_path: str, starting: StartingConfig, metrics_in: str | None) -> int:
    # The count `--workers` asked for is the config's (config/loader.py, ENV_WORKERS), and so
    # is the check that memory:// storage has one.
    count = starting.peek().server.workers
    if count == 1:
        # One process needs no shared metrics files: the in-memory registry is faster.
        starting.take_answer()  # one process reads no handed-over config
        return _run_worker_process(config_path, starting, handover=None, index=0)
    from gateway import metrics

    try:
        directory = metrics.prepare_multiprocess_dir(None, within=metrics_in)
    except OSError as exc:
        where = metrics_in or tempfile.gettempdir()
        print(
            f"PROMETHEUS_MULTIPROC_DIR: cannot make the workers' metrics folder in {where}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    try:
        return supervise(config_path, starting, count, _run_worker_process)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps a dev box going
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# --- worker ---------------------------------------------------------------------------


def _run_worker_process(
    config_path: str, starting: StartingConfig, *, handover: str | None, index: int
) -> int:
    """`handover`: where a supervisor saves reloaded configs (None: not supervised); `index`:
    the worker's number (0 for a single process)."""
    _install_uvloop()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            _run_bounded(_worker(config_path, starting, handover=handover, index=index))
    finally:
        # A worker that failed before its drain still writes the lines it gathered: a
        # supervised one leaves with os._exit, which skips every exit handler.
        accesslog.flush_access_log()
    return 0


def _run_bounded(main: Coroutine[Any, Any, float | None]) -> None:
    """`asyncio.run(main)`, but the tasks left when `main` ends are waited for within a bound:
    `asyncio.run` cancels them and waits for good, and a task that lost its cancellation (see
    `gateway.tasks`) kept the worker from exiting. `main` returns when its closing must end
    (loop time; None: CLOSE_TIMEOUT from its return)."""
    loop = asyncio.new_event_loop()  # uvloop's, by the policy installed
    asyncio.set_event_loop(loop)
    close_by: float | None = None
    try:
        close_by = loop.run_until_complete(main)
    finally:
        try:
            if close_by is None:
                close_by = loop.time() + CLOSE_TIMEOUT
            left = asyncio.all_tasks(loop)
            if left:
                within = max(_LAST_STEP, close_by - loop.time())
                loop.run_until_complete(stop_tasks(left, within, "tasks left at exit"))
            closing = _bounded(loop.shutdown_asyncgens(), "closing generators", close_by)
            loop.run_until_complete(closing)
            threads = loop.shutdown_default_executor()
            loop.run_until_complete(_bounded(threads, "the worker's threads", close_by))
        finally:
            asyncio.set_event_loop(None)
            loop.close()


async def _bounded(step: Awaitable[object], what: str, close_by: float) -> None:
    """Await `step` until `close_by` (loop time; at least _LAST_STEP)."""
    within = max(_LAST_STEP, close_by - asyncio.get_running_loop().time())
    await finish_within(step, within, what)


class Worker:
    """The proxy and admin servers of one process; tests start it in their own event loop."""

    def __init__(
        self,
        config_path: str | None,
        config: Config,
        *,
        supervised: bool,
        handover: str | None = None,
        tells_shared_warnings: bool = True,
    ) -> None:
        """`tells_shared_warnings`: whether this worker tells what every worker would find
        alike in the API keys (`KeyStore.tells_shared_warnings`): worker 0 of a supervisor's."""
        from gateway.runtime import build_runtime

        # What only a restart changes, for the reloads (`keep_restart_only`); not the keys,
        # which the first snapshot holds until a reload replaces them.
        self.config = restart_only(config)
        self.runtime = build_runtime(config)
        self.runtime.key_store.tells_shared_warnings = tells_shared_warnings
        self._config_path = config_path
        self._supervised = supervised
        self._handover = handover
        self._proxy_server: HttpServer | None = None
        self._admin_runner: web.AppRunner | None = None
        self._proxy_listener: asyncio.Server | None = None
        self.reloader: Reloader | None = None
        self.proxy_port = 0
        self.admin_port = 0
        self._batching = False  # whether this worker gathers access log lines into batches
        self._draining = False  # /readyz answers 503 from the start of the drain

    async def start(self) -> None:
        from gateway import metrics
        from gateway.admin import ADMIN_HTTP_LOG, build_admin_app
        from gateway.admin_http import AdminRunner
        from gateway.keys.api import KeysAccess
        from gateway.runtime import build_proxy_server

        loop = asyncio.get_running_loop()
        server_config = self.config.server
        # API keys are loaded before the first request, so a restart does not answer 401 to
        # keys it has simply not read yet.
        await self.runtime.key_store.start()
        self._proxy_server = build_proxy_server(self.runtime, server_config)
        proxy_socket = open_listener(server_config.listen)
        self.proxy_port = proxy_socket.getsockname()[1]
        self._proxy_listener = await loop.create_server(
            self._proxy_server,
            sock=proxy_socket,
            backlog=LISTEN_BACKLOG,
            # No ssl: with server.tls the server starts TLS on each connection itself (see
            # gateway/http/tls_port.py), the handshake within client_header of the accept.
        )
        runtime = self.runtime
        admin_app = build_admin_app(
            lambda: runtime.snapshot.config,
            runtime.limiter,
            token=server_config.admin_token,
            keys=KeysAccess(lambda: runtime.snapshot, runtime.key_store),
            draining=lambda: self._draining,
        )
        self._admin_runner = AdminRunner(
            admin_app,
            access_log=None,
            logger=ADMIN_HTTP_LOG,
            # Bodies are taken as they are (admin_json.json_object refuses a coding): aiohttp's
            # own decoding failed as a 500, or as a plain-text 400 for codings it lacks.
            auto_decompress=False,
            # aiohttp's one timer for a connection that has not sent a whole request head, the
            # first or the next: so a head must arrive within client_header, as on the proxy
            # port, and an idle connection is closed after as long (README, "Admin API").
            keepalive_timeout=server_config.timeouts.client_header,
        )
        await self._admin_runner.setup()
        admin_socket = open_listener(server_config.admin_listen)
        self.admin_port = admin_socket.getsockname()[1]
        await web.SockSite(self._admin_runner, admin_socket).start()
        if self._config_path is not None:
            # Under a supervisor the supervisor watches and counts; a worker re-reads on SIGHUP.
            self.reloader = Reloader(
                self._config_path,
                self.apply_config,
                count=None if self._supervised else metrics.count_reload,
                handed_over_in=self._handover,
                prepare=self.prepare_config,
            )
            if not self._supervised:
                self.reloader.start_watching()
        accesslog.start_batching(loop)
        self._batching = True

    def apply_config(self, config: Config, keys: KeyIndex | None = None) -> None:
        """Serve `config` from now on; `keys`: its key index, when built beforehand."""
        if not self._supervised:  # else the supervisor says it, once for all its workers
            warn_of_restart_only_changes(self.config, config)
        config = keep_restart_only(self.config, config)
        self.runtime.apply(config, keys)
        self._renew_certificate(config)
        # By one worker of a supervisor's, as the config's own warnings are by the supervisor
        # alone: every worker reads the same API keys, the supervisor none (see KeyStore).
        if self.runtime.key_store.tells_shared_warnings:
            # The config file's keys cannot name a product or plan the file lacks (a config
            # error), but API keys live in the storage: a reload that takes out what they name
            # is taken, and said, so that it is not found by the customers.
            self.runtime.key_store.tell_not_in_config()
            self.runtime.snapshot.keys.secret_clashes.tell()

    def _renew_certificate(self, config: Config) -> None:
        # The loader has read the certificate and key again and built a context from them:
        # new handshakes use it, open connections keep theirs. (Switching TLS on or off needs
        # a new listener, which only a restart makes: `keep_restart_only` has kept it as it was.)
        server, tls = self._proxy_server, config.server.tls
        if server is not None and tls is not None:
            server.renew_certificate(tls.context)

    async def prepare_config(self, config: Config) -> Callable[[], None]:
        """Index the keys in a thread (bytecode: the loop gets the GIL back every few ms);
        what is left on the loop is building the snapshot around the index and the swap."""
        keys = await asyncio.to_thread(self.runtime.index_keys, config)
        return functools.partial(self.apply_config, config, keys)

    def reload(self) -> None:
        """Start a reload (for the SIGHUP handler, which cannot wait for one)."""
        if self.reloader is not None:
            self.reloader.request_reload()

    async def reload_now(self) -> None:
        if self.reloader is not None:
            await self.reloader.reload_off_loop()

    async def drain(self) -> float:
        """Stop accepting, let in-flight requests finish (up to drain_timeout), close all
        (CLOSE_TIMEOUT at most); returns when the closing must end (loop time), for the
        tasks left behind."""
        self._draining = True
        if self.reloader is not None:
            await self.reloader.stop()
        from gateway.runtime import close_runtime

        if self._proxy_listener is not None:
            self._proxy_listener.close()
        served = self._proxy_server
        if served is not None:
            await served.shutdown(self.config.server.drain_timeout)
            self._proxy_server = None
        close_by = asyncio.get_running_loop().time() + CLOSE_TIMEOUT
        if served is not None:
            closing = close_runtime(self.runtime)
            await _bounded(closing, "closing the storage and upstream connections", close_by)
        if self._admin_runner is not None:
            await _bounded(self._admin_runner.cleanup(), "closing the admin port", close_by)
        if self._batching:
            # Every request has been answered (or cut off) and logged: write the last batch.
            accesslog.stop_batching()
            self._batching = False
        return close_by


async def _worker(
    config_path: str, starting: StartingConfig, *, handover: str | None, index: int
) -> float:
    loop = asyncio.get_running_loop()
    with collector_paused():  # the key index: as many objects again, and no cycles either
        worker = Worker(
            config_path,
            starting.take(),
            supervised=handover is not None,
            handover=handover,
            tells_shared_warnings=index == 0,
        )
    # The first full read of the API keys, at the start, freezes them as it goes as each later
    # one does: left to the collector, 100,000 keys set off four full collections of 30-87 ms
    # before the worker served.
    worker.runtime.key_store.freeze_reads = True
    await worker.start()
    freeze_long_lived()  # the config and its snapshot: see gateway.reload
    worker.runtime.freeze_made_principals()  # and the principals made for requests
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, worker.reload)
    # A supervised worker is forked with SIGHUP blocked. One that came meanwhile is taken off
    # here and its reload awaited, so that the worker says it serves once it serves that
    # config (the handler would only start the reload, which finishes a moment later).
    if signal.SIGHUP in signal.sigpending():
        signal.sigtimedwait({signal.SIGHUP}, 0)
        await worker.reload_now()
    # A single worker had them all held since `serve` began: a SIGTERM that came during the
    # start now stops it, drained (there is nothing in flight) and with exit 0.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    log.info(
        "worker %d serving %s (admin %s)",
        os.getpid(),
        worker.config.server.listen,
        worker.config.server.admin_listen,
    )
    await stop.wait()
    listen_claim.release()  # a single-process gateway's own (a worker holds none)
    _ignore_further_stops(loop)
    log.info("worker %d draining", os.getpid())
    return await worker.drain()


def _ignore_further_stops(loop: asyncio.AbstractEventLoop) -> None:
    """Once the drain has begun, a repeated SIGTERM or SIGINT (a runtime that sends it again, a
    second Ctrl-C) is ignored, and so is SIGHUP (a reload is moot now): the drain is bounded by
    drain_timeout, and SIGKILL still ends it.

    Why not leave the loop's handlers in place: closing the loop puts the default actions
    back, and a SIGTERM arriving between that and the process's exit would kill it with -15
    (seen in CI). Removing the loop's handler also sets the default action, so the signals are
    held in this thread until SIG_IGN is in place; the interpreter's exit leaves SIG_IGN be."""
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        for sig in FORWARDED_SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    finally:
        # A pending one is ignored, so dropped, when it is unblocked.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
