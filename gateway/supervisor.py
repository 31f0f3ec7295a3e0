"""The supervisor of a gateway with several workers: forks them, passes signals on, restarts
one that dies, validates reloads once for all of them and hands each the result."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Protocol

from gateway import listen_claim
from gateway.config.isolated import save_answer
from gateway.config.model import Config
from gateway.reload import (
    POLL_INTERVAL,
    Reloader,
    StartingConfig,
    restart_only,
    warn_of_restart_only_changes,
)
from gateway.worker_stats import name_workers

log = logging.getLogger("gateway.server")


class RunWorker(Protocol):
    """What a forked worker runs (`gateway.server`'s worker process); its exit code. `index`:
    the worker's number, from 0, kept by the worker started in place of one that died."""

    def __call__(
        self, config_path: str, starting: StartingConfig, *, handover: str | None, index: int
    ) -> int: ...


# The signals the supervisor passes on to its workers, and that a process holds while it
# starts (see `gateway.server.serve`).
FORWARDED_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}

# A worker that dies is started again after RESTART_DELAY. One that dies within STEADY_AFTER
# of its start is crash-looping (a bad host, memory it cannot get): each such death doubles
# the wait, up to RESTART_DELAY_MAX, so that it neither spins the machine nor floods the log
# with a traceback twice a second. A worker that lived longer starts the count again.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
STEADY_AFTER = 10.0


def _name_workers(children: dict[int, int]) -> None:
    """Tell the scrapes which processes are workers (`gateway_worker_*` metrics)."""
    from gateway import metrics

    directory = metrics.multiprocess_dir()
    if directory is None:
        return
    try:
        name_workers(directory, children)
    except OSError as exc:  # the folder gone or full: the metrics lack workers, serving goes on
        log.warning("cannot name the workers for /metrics: %s", exc)


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


def supervise(config_path: str, starting: StartingConfig, count: int, run_worker: RunWorker) -> int:
    """Run `count` workers (each `run_worker(config_path, starting, handover=..., index=...)`
    in a forked process) until they have drained; the exit code."""
    # The config the workers are to serve, as the supervisor read it (see Reloader).
    handover_dir = tempfile.mkdtemp(prefix="gateway-config-")
    try:
        handover = os.path.join(handover_dir, "config.pickle")
        save_answer(starting.take_answer(), handover)
        return _supervise_workers(config_path, starting, count, handover, run_worker)
    finally:
        shutil.rmtree(handover_dir, ignore_errors=True)


def _supervise_workers(
    config_path: str, starting: StartingConfig, count: int, handover: str, run_worker: RunWorker
) -> int:
    from gateway import metrics

    children: dict[int, int] = {}  # pid -> worker index
    started: dict[int, float] = {}  # pid -> when it was forked (monotonic)
    restart_delay: dict[int, float] = {}  # worker index -> its next wait after a quick death
    restart_at: dict[int, float] = {}  # worker index -> when to start it again
    stopping = False
    # A worker started after a reload must start from the reloaded config, with what only a
    # restart applies as the others have it (`keep_restart_only`). A forked worker takes the
    # config out of its copy of `latest` (see StartingConfig). Taken out of `starting` here,
    # which the frames of this process hold: a reload then lets the started config go.
    first = restart_only(starting.peek())
    latest = StartingConfig(starting.take())

    def spawn(index: int) -> None:
        # Until the new worker is in `children`, a signal to forward would miss it: hold them.
        # SIGHUP stays held in the worker until its own handler is in place (see _worker), as
        # its default action kills: a reload during a worker's start is neither fatal nor lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        try:
            if stopping:
                # A SIGTERM came first (while a crashed worker waited to restart, say): it went to
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
                    code = run_worker(config_path, latest, handover=handover, index=index)
                except BaseException:
                    # os._exit skips the interpreter's own report: without this the log said
                    # only that the worker exited with 1.
                    log.exception("worker %d failed", index)
                finally:
                    os._exit(code)
            children[pid] = index
            started[pid] = time.monotonic()
            _name_workers(children)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)

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
        warn_of_restart_only_changes(first, reloaded)
        # Not kept here: a worker started from now on reads it where the running ones do.
        latest = StartingConfig.saved(handover, first)
        forward(signal.SIGHUP, None)

    exit_code = 0

    def collect(pid: int, status: int) -> None:
        """A child that exited: a worker is started again (or, stopping, its code kept)."""
        nonlocal exit_code
        index = children.pop(pid, -1)
        lived = time.monotonic() - started.pop(pid, 0.0)
        if index < 0:
            # Not a worker: a child the process had before it became the gateway (`sh -c
            # 'tool & exec gateway ...'`), or, as a container's pid 1, an orphan it adopted.
            # Collecting it is all there is to do (pid 1 must, or zombies pile up).
            return
        metrics.mark_worker_dead(pid)
        _name_workers(children)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            if code != 0:
                # Said, so that an operator sees it; a worker killed by a signal (a negative
                # code) before its handlers were in place had nothing to lose and leaves the
                # exit code 0, an error code of a worker's own is passed on.
                log.warning("worker %d (pid %d) exited with %d while stopping", index, pid, code)
            exit_code = exit_code or (code if code > 0 else 0)
            return
        delay = restart_delay.get(index, RESTART_DELAY) if lived < STEADY_AFTER else RESTART_DELAY
        restart_delay[index] = min(delay * 2, RESTART_DELAY_MAX)
        restart_at[index] = time.monotonic() + delay
        log.error(
            "worker %d (pid %d) exited with %d after %.1f s; starting a new one in %.1f s",
            *(index, pid, code, lived, delay),
        )

    def restart_due() -> None:
        now = time.monotonic()
        for index, when in sorted(restart_at.items()):
            if now >= when:
                del restart_at[index]
                spawn(index)

    def tend_workers_while_reading() -> None:
        # A reload blocks the loop below for as long as its child reads the files (5-8 s for
        # 100,000 keys), and a worker that died meanwhile was started again only after it.
        # Each worker is waited for by its pid: waitpid(-1) would collect the reading child.
        for pid in list(children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done:
                collect(done, status)
        if not stopping:
            restart_due()

    reloader = Reloader(
        config_path,
        hand_to_workers,
        count=metrics.count_reload,
        hand_over_in=handover,
        while_reading=tend_workers_while_reading,
    )

    reload_asked = False

    def on_sighup(_sig: int, _frame: Any) -> None:
        # Noted, and done by the loop below: a reload run here ran inside the one the signal
        # interrupted (its child still reading the files), and that older reading, handed
        # over last, replaced the newer one; the edit between them was never served.
        nonlocal reload_asked
        if not stopping:  # a reload during the drain is moot, as a worker's own is
            reload_asked = True

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, on_sighup)
    # Held since `serve` began; one that came meanwhile is acted on now (spawn unblocks them
    # too, which is where a SIGTERM that came during the start stops what it started).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    for index in range(count):
        spawn(index)
    log.info("supervising %d workers", count)

    next_poll = time.monotonic() + POLL_INTERVAL
    while children or (restart_at and not stopping):
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            if not restart_at:
                break
            pid, status = 0, 0  # no child left, but a restart to wait for
        if pid == 0:
            if stopping:
                # The nap only paces waitpid: no poll, and no restart (spawn would refuse).
                restart_at.clear()
                time.sleep(0.2)
                continue
            restart_due()
            # Awake for the next poll or restart, not a fixed nap after it: naps of 0.2 s made
            # the polls 0.4 s apart, and an edit (seen on two polls) took up to 0.8 s to load.
            wake = min([next_poll, *restart_at.values()])
            time.sleep(min(0.2, max(0.0, wake - time.monotonic())))
            if reload_asked and not stopping:
                reload_asked = False
                reloader.reload()
            elif time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL_INTERVAL
                reloader.poll()
            continue
        collect(pid, status)
    # The interpreter's exit puts the default action back in place of a Python handler, so
    # a SIGTERM repeated in that moment would kill the supervisor with -15; ignored instead.
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    return exit_code
