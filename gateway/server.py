"""Processes, sockets and signals.

    gateway run
    └── supervisor (workers > 1): forks N workers, restarts a crashed one, forwards SIGHUP and
        │                         SIGTERM, watches the config and counts reloads
        └── worker: uvloop, its own SO_REUSEPORT sockets on the proxy and admin ports, the
                    proxy and admin apps, graceful drain on SIGTERM, reload on SIGHUP

With one worker the supervisor is skipped and the single process does everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway import accesslog, listen_claim
from gateway.config import ConfigError
from gateway.config.isolated import read_config_isolated, save_answer
from gateway.config.model import Address, Config
from gateway.reload import (
    POLL_INTERVAL,
    Reloader,
    freeze_long_lived,
    keep_restart_only,
    warn_of_restart_only_changes,
)

if TYPE_CHECKING:
    from gateway.http.server import HttpServer
    from gateway.keys import KeyIndex

log = logging.getLogger("gateway.server")

# Seconds a TLS connection being closed waits for the client's close_notify before its socket
# goes: nginx does not wait at all; a client that answers does so within a round trip.
TLS_SHUTDOWN_TIMEOUT = 1.0


def open_listener(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Every worker binds its own socket to the same port; the kernel spreads connections.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address.host, address.port))
    sock.listen(1024)
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


def serve(config_path: str, workers: int | None = None, metrics_in: str | None = None) -> int:
    """Run the gateway until it has drained; its exit code. `metrics_in`: the folder in which
    to make the workers' metrics folder (default: the system's temporary folder)."""
    # Held from the start until the handlers that act on them are in place (the supervisor's,
    # or a single worker's once it serves): a SIGTERM while the config is read or the keys
    # load is then a stop with exit 0, and a SIGHUP a reload, where the default actions
    # killed the process (143, 129), and where a container's pid 1 dropped them unseen.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    try:
        return _serve(config_path, workers, metrics_in)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _serve(config_path: str, workers: int | None, metrics_in: str | None) -> int:
    try:
        # In a child process: the parse's memory leaves with it, and the workers forked from
        # this process share only the result.
        answer, config = read_config_isolated(config_path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    try:
        taken = listen_claim.claim(listen_addresses(config)) or taken_address(config)
        if taken is not None:
            print(f"{config_path}: {taken}", file=sys.stderr)
            return 1
        return _serve_claimed(config_path, config, answer, workers, metrics_in)
    finally:
        listen_claim.release()  # given up at the drain already; here on every other way out


def _serve_claimed(
    config_path: str, config: Config, answer: bytes, workers: int | None, metrics_in: str | None
) -> int:
    count = workers if workers is not None else config.server.workers
    if count == 0:
        count = os.cpu_count() or 1
    if count > 1 and config.storage.is_memory:
        print(
            f"{config_path}: storage.url: memory:// keeps limits inside one process; "
            f"{count} workers need Redis",
            file=sys.stderr,
        )
        return 1
    if count == 1:
        # One process needs no shared metrics files: the in-memory registry is faster.
        return _run_worker_process(config_path, config, handover=None)
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
        return _supervise(config_path, config, count, answer)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps a dev box going
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# --- supervisor -------------------------------------------------------------------------

_FORWARDED = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


def _end_with_the_supervisor(supervisor: int) -> None:
    """In a forked worker: get SIGTERM (and so drain) when the supervisor (pid `supervisor`)
    dies, however it dies. A supervisor killed outright would otherwise leave its workers
    serving the port for ever, unsupervised. Linux only (prctl PR_SET_PDEATHSIG); elsewhere
    nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError) as exc:
        log.warning("workers will not end with a killed supervisor: %s", exc)
        return
    if os.getppid() != supervisor:
        # The supervisor died before the prctl: its orphan was handed to another parent. (Not
        # "the parent is pid 1": in a container the supervisor itself is pid 1.)
        os.kill(os.getpid(), signal.SIGTERM)


def _supervise(config_path: str, config: Config, count: int, answer: bytes) -> int:
    # The config the workers are to serve, as the supervisor read it (see Reloader).
    handover_dir = tempfile.mkdtemp(prefix="gateway-config-")
    try:
        handover = os.path.join(handover_dir, "config.pickle")
        save_answer(answer, handover)
        return _supervise_workers(config_path, config, count, handover)
    finally:
        shutil.rmtree(handover_dir, ignore_errors=True)


def _supervise_workers(config_path: str, config: Config, count: int, handover: str) -> int:
    from gateway import metrics

    children: dict[int, int] = {}  # pid -> worker index
    stopping = False
    # A worker started after a reload must start from the reloaded config, with what only a
    # restart applies as the others have it (`keep_restart_only`).
    latest = config

    def spawn(index: int) -> None:
        # Until the new worker is in `children`, a signal to forward would miss it: hold them.
        # SIGHUP stays held in the worker until its own handler is in place (see _worker), as
        # its default action kills: a reload during a worker's start is neither fatal nor lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            if stopping:
                # A SIGTERM came first (during a crashed worker's restart nap, say): it went to
                # the workers there were, and a new one would never hear of it, serving on
                # while the supervisor waited for it.
                return
            supervisor = os.getpid()
            pid = os.fork()
            if pid == 0:
                listen_claim.release()  # the supervisor's to hold
                _end_with_the_supervisor(supervisor)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
                code = 1
                try:
                    code = _run_worker_process(config_path, latest, handover=handover)
                except BaseException:
                    # os._exit skips the interpreter's own report: without this the log said
                    # only that the worker exited with 1.
                    log.exception("worker %d failed", index)
                finally:
                    os._exit(code)
            children[pid] = index
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)

    def forward(sig: int, _frame: Any) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            listen_claim.release()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    # The supervisor validates reloads and counts them once, not once per worker.
    def hand_to_workers(reloaded: Config) -> None:
        nonlocal latest
        warn_of_restart_only_changes(config, reloaded)
        latest = keep_restart_only(config, reloaded)
        forward(signal.SIGHUP, None)

    reloader = Reloader(
        config_path, hand_to_workers, count=metrics.count_reload, hand_over_in=handover
    )

    def on_sighup(_sig: int, _frame: Any) -> None:
        if not stopping:  # a reload during the drain is moot, as a worker's own is
            reloader.reload()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, on_sighup)
    # Held since `serve` began; one that came meanwhile is acted on now (spawn unblocks them
    # too, which is where a SIGTERM that came during the start stops what it started).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    for index in range(count):
        spawn(index)
    log.info("supervising %d workers", count)

    exit_code = 0
    next_poll = time.monotonic() + POLL_INTERVAL
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            # Awake for the next poll, not a fixed nap after it: naps of 0.2 s made the polls
            # 0.4 s apart, and an edit (seen on two polls) took up to 0.8 s to be loaded.
            # Stopping, there is no poll to wait for: the nap only paces waitpid.
            until_poll = next_poll - time.monotonic()
            time.sleep(0.2 if stopping else min(0.2, max(0.0, until_poll)))
            if not stopping and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL_INTERVAL
                reloader.poll()
            continue
        index = children.pop(pid, -1)
        if index < 0:
            # Not a worker: a child the process had before it became the gateway (`sh -c
            # 'tool & exec gateway ...'`), or, as a container's pid 1, an orphan it adopted.
            # Collecting it is all there is to do (pid 1 must, or zombies pile up).
            continue
        metrics.mark_worker_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            if code != 0:
                # Said, so that an operator sees it; a worker killed by a signal (a negative
                # code) before its handlers were in place had nothing to lose and leaves the
                # exit code 0, an error code of a worker's own is passed on.
                log.warning("worker %d (pid %d) exited with %d while stopping", index, pid, code)
            exit_code = exit_code or (code if code > 0 else 0)
            continue
        log.error("worker %d (pid %d) exited with %d; starting a new one", index, pid, code)
        time.sleep(0.5)  # a worker that dies at once should not spin the machine
        spawn(index)
    # The interpreter's exit puts the default action back in place of a Python handler, so
    # a SIGTERM repeated in that moment would kill the supervisor with -15; ignored instead.
    for sig in _FORWARDED:
        signal.signal(sig, signal.SIG_IGN)
    return exit_code


# --- worker ---------------------------------------------------------------------------


def _run_worker_process(config_path: str, config: Config, *, handover: str | None) -> int:
    """`handover`: where a supervisor saves reloaded configs (None: not supervised)."""
    _install_uvloop()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_worker(config_path, config, handover=handover))
    finally:
        # A worker that failed before its drain still writes the lines it gathered: a
        # supervised one leaves with os._exit, which skips every exit handler.
        accesslog.flush_access_log()
    return 0


class Worker:
    """The proxy and admin servers of one process; tests start it in their own event loop."""

    def __init__(
        self,
        config_path: str | None,
        config: Config,
        *,
        supervised: bool,
        handover: str | None = None,
    ) -> None:
        from gateway.runtime import build_runtime

        self.config = config
        self.runtime = build_runtime(config)
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
            ssl=self._proxy_server.listener_ssl,
            # A handshake is part of the request head as far as a slow client is concerned.
            ssl_handshake_timeout=(
                server_config.timeouts.client_header if server_config.tls is not None else None
            ),
            # How long a closing TLS connection waits for the client's close_notify; asyncio's
            # 30 s held every idle keep-alive client's connection (and so a drain) that long.
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT if server_config.tls is not None else None,
        )
        runtime = self.runtime
        admin_app = build_admin_app(
            lambda: runtime.snapshot.config,
            runtime.limiter,
            token=server_config.admin_token,
            keys=KeysAccess(lambda: runtime.snapshot, runtime.key_store),
            draining=lambda: self._draining,
        )
        self._admin_runner = web.AppRunner(
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
        self._warn_of_plans_api_keys_lost(config)

    def _warn_of_plans_api_keys_lost(self, config: Config) -> None:
        # The config file's keys cannot name a plan the file lacks (a config error), but API
        # keys live in the storage: a reload that drops their plan is taken, and their
        # requests are 403 from now on. Said here so that it is not found by the customers.
        missing = self.runtime.key_store.table.plans_missing(config.plans)
        for plan, count in sorted(missing.items()):
            log.warning(
                "API keys: %d product entries of API keys name the plan '%s', which the config"
                " no longer has; those requests are 403 until the plan is back or the keys are"
                " changed (PATCH /admin/keys/NAME)",
                count,
                plan,
            )

    def _renew_certificate(self, config: Config) -> None:
        # The loader has read the certificate and key again and built a context from them:
        # new handshakes use it, open connections keep theirs. (Switching TLS on or off needs
        # a new listener, which only a restart makes: `keep_restart_only` has kept it as it was.)
        server, tls = self._proxy_server, config.server.tls
        if server is not None and tls is not None and server.listener_ssl is not None:
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

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_timeout), close all."""
        self._draining = True
        if self.reloader is not None:
            await self.reloader.stop()
        from gateway.runtime import close_runtime

        if self._proxy_listener is not None:
            self._proxy_listener.close()
        if self._proxy_server is not None:
            await self._proxy_server.shutdown(self.config.server.drain_timeout)
            self._proxy_server = None
            await close_runtime(self.runtime)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._batching:
            # Every request has been answered (or cut off) and logged: write the last batch.
            accesslog.stop_batching()
            self._batching = False


async def _worker(config_path: str, config: Config, *, handover: str | None) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(config_path, config, supervised=handover is not None, handover=handover)
    await worker.start()
    freeze_long_lived()  # the config and its snapshot: see gateway.reload
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
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    log.info(
        "worker %d serving %s (admin %s)",
        os.getpid(),
        config.server.listen,
        config.server.admin_listen,
    )
    await stop.wait()
    listen_claim.release()  # a single-process gateway's own (a worker holds none)
    _ignore_further_stops(loop)
    log.info("worker %d draining", os.getpid())
    await worker.drain()


def _ignore_further_stops(loop: asyncio.AbstractEventLoop) -> None:
    """Once the drain has begun, a repeated SIGTERM or SIGINT (a runtime that sends it again, a
    second Ctrl-C) is ignored, and so is SIGHUP (a reload is moot now): the drain is bounded by
    drain_timeout, and SIGKILL still ends it.

    Why not leave the loop's handlers in place: closing the loop puts the default actions
    back, and a SIGTERM arriving between that and the process's exit would kill it with -15
    (seen in CI). Removing the loop's handler also sets the default action, so the signals are
    held in this thread until SIG_IGN is in place; the interpreter's exit leaves SIG_IGN be."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    try:
        for sig in _FORWARDED:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    finally:
        # A pending one is ignored, so dropped, when it is unblocked.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
