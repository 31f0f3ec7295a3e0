"""Reading and validating a config in a child process: the serving process gets a `Config`.

Why a process and not a thread: parsing and validating 10,000 keys is about a second of CPU
under the GIL. In a thread of a worker, the event loop gets the GIL back only every few
milliseconds (the interpreter's switch interval) for that whole second, so every request in
flight waits a little, again and again (measured: the loop's worst delay was 40 ms; with
`yaml.compose`, whose C composer never lets go of the GIL, 230 ms). A child process parses
on the other core, and its memory (the node tree of a big file is
several times the size of the result) goes back to the system when it exits instead of
staying in the serving process's heap. The child sends back the pickled `Config` or the list
of issues, with the load's warnings (`gateway.config.load_warnings`); unpickling is a fraction
of the parse and happens in a thread. The warnings are told where the answer is first read
(`config_from_answer(..., tell=True)`), not where it is computed nor where a supervisor's
workers read it again: once per load.

The child is forked when this process has a single thread (a gateway starting, the
supervisor): it starts at once with everything imported. A worker, which has threads, starts
a new Python instead (`python -m gateway.config`, a quarter to half a second more).

A small config (under `CHILD_FROM_BYTES` of YAML, a couple of thousand keys) is read in
this process instead, in a thread when asked from the event loop: there the parse is shorter
than starting a child. When no child can be started, the config is read in this process too:
slower, but never a failed reload for that reason.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from gateway.config.files import config_files
from gateway.config.load_warnings import LoadWarning, tell_warnings
from gateway.config.loader import load_config, load_config_gathering
from gateway.config.model import Config, TlsConfig
from gateway.config.yamlnodes import ConfigError, ConfigIssue
from gateway.http.tls import TlsFileError, server_context

log = logging.getLogger("gateway.config")

_OK = "ok"
_INVALID = "invalid"
# The folder that holds the `gateway` package, so that the child imports this very copy.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
CHILD_FROM_BYTES = 256 * 1024
_FAILURES = (OSError, pickle.UnpicklingError, ValueError, EOFError, TypeError)
# How often `read_config_isolated`'s `while_waiting` is called while a child reads.
WAITING_STEP = 0.2


def _worth_a_child(path: str | os.PathLike[str]) -> bool:
    """Whether the YAML at `path` (a file, or a folder's *.yaml) is big enough for a child."""
    try:
        files = config_files(Path(path))
        return sum(os.stat(file).st_size for file in files) >= CHILD_FROM_BYTES
    except OSError:
        return False  # the loader reports what is missing, with the file's name


def _child_command(path: str) -> list[str]:
    # `gateway.config`'s __main__: the child imports the loader and nothing else.
    return [sys.executable, "-m", "gateway.config", os.fspath(path)]


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    child = dict(os.environ if env is None else env)
    # The child's Python must find this package even when it was not installed.
    existing = child.get("PYTHONPATH", "")
    child["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, existing) if p)
    return child


def answer_for(path: str | os.PathLike[str], env: Mapping[str, str]) -> bytes:
    """What the child writes: the pickled `Config`, or the issues that make it invalid; and
    the load's warnings, told by the reader of the answer, not here."""
    answer: tuple[str, Config | tuple[ConfigIssue, ...], tuple[LoadWarning, ...]]
    warnings: list[LoadWarning] = []
    try:
        config = load_config_gathering(path, env, warnings)
    except ConfigError as exc:
        invalid = (_INVALID, exc.issues, tuple(warnings))
        return pickle.dumps(invalid, protocol=pickle.HIGHEST_PROTOCOL)
    answer = (_OK, config, tuple(warnings))
    if config.server.tls is None:
        return pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
    # Rare enough to afford a Python hook per pickled object (see _TlsPickler).
    output = io.BytesIO()
    _TlsPickler(output, protocol=pickle.HIGHEST_PROTOCOL).dump(answer)
    return output.getvalue()


class _TlsPickler(pickle.Pickler):
    """An SSLContext cannot be pickled: a `TlsConfig` travels as its two file names, and
    the context is built again from them where it is unpickled (files validated a moment
    before; if they went missing meanwhile, the answer is a config error naming them)."""

    def reducer_override(self, obj: object) -> Any:
        if type(obj) is TlsConfig:
            return _tls_config_from_files, (obj.cert, obj.key)
        return NotImplemented


def _tls_config_from_files(cert: str, key: str) -> TlsConfig:
    return TlsConfig(cert, key, server_context(cert, key))


def config_from_answer(answer: bytes, *, tell: bool) -> Config:
    """The `Config` of an answer; `ConfigError` for the answer of an invalid config.

    `tell`: log the load's warnings (which a valid and an invalid config alike may have). For
    the first reader of the answer only: a supervisor's workers read it again (each, and one
    started after a reload again), and a warning said by each was said 1 + N times."""
    try:
        kind, payload, warnings = pickle.loads(answer)
    except TlsFileError as exc:
        raise ConfigError(
            [ConfigIssue(str(exc).split(" ", 1)[0], None, f"server.tls.{exc.role}", str(exc))]
        ) from exc
    if tell:
        tell_warnings(warnings)
    if kind == _INVALID:
        raise ConfigError(payload)
    if kind != _OK or not isinstance(payload, Config):
        raise ValueError(f"unexpected answer {kind!r}")
    return payload


def read_config_isolated(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    while_waiting: Callable[[], None] | None = None,
) -> tuple[bytes, Config]:
    """The config at `path`, read in a child process when it is big (blocking), and its
    answer: the bytes a supervisor hands its workers. Raises `ConfigError` as `load_config`
    does, and logs the load's warnings. The answer is unpickled once, here. `while_waiting`:
    called every WAITING_STEP seconds while a forked child reads (the supervisor tends its
    workers meanwhile); it must not reap that child."""
    environment = os.environ if env is None else env
    if _worth_a_child(path):
        try:
            if hasattr(os, "fork") and threading.active_count() == 1:
                answer = _answer_from_fork(path, environment, while_waiting)
            else:
                answer = _answer_from_new_python(path, env)
            # A garbled answer (a crash halfway through writing) fails here: read it here.
            return answer, config_from_answer(answer, tell=True)
        except _FAILURES as exc:
            log.warning("reading the config in a child process failed (%s); reading it here", exc)
    answer = answer_for(path, environment)
    return answer, config_from_answer(answer, tell=True)


def _answer_from_fork(
    path: str | os.PathLike[str],
    env: Mapping[str, str],
    while_waiting: Callable[[], None] | None = None,
) -> bytes:
    """A forked child computes the answer: it starts at once, with everything imported.
    Only for a process with one thread (a starting gateway, the supervisor), where a fork
    copies no lock that another thread holds."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, write, leave without running the parent's cleanup
        code = 1
        try:
            os.close(reader)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)  # the parent's handlers are not ours
            answer = answer_for(path, env)
            with os.fdopen(writer, "wb") as sink:
                sink.write(answer)
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as source:
        answer = source.read() if while_waiting is None else _read_all(source, while_waiting)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"the child exited with {os.waitstatus_to_exitcode(status)}")
    return answer


def _read_all(source: BinaryIO, while_waiting: Callable[[], None]) -> bytes:
    """What `source` (a pipe) gives until its end, calling `while_waiting` whenever it has
    given nothing for WAITING_STEP seconds (the child writes its answer at the end of a parse
    of up to several seconds)."""
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([source], [], [], WAITING_STEP)
        if not ready:
            while_waiting()
            continue
        chunk = os.read(source.fileno(), 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _answer_from_new_python(path: str | os.PathLike[str], env: Mapping[str, str] | None) -> bytes:
    done = subprocess.run(
        _child_command(os.fspath(path)),
        env=_child_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise OSError(_describe(done.returncode, done.stderr))
    return done.stdout


async def load_config_off_loop(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> Config:
    """`load_config` without holding up the event loop: in a child process, else a thread.
    The load's warnings are logged (a child's too, which were lost with its stderr)."""
    import asyncio  # here: the child process, which imports this module, needs no event loop

    if not _worth_a_child(path):
        return await asyncio.to_thread(load_config, path, os.environ if env is None else env)
    try:
        child = await asyncio.create_subprocess_exec(
            *_child_command(os.fspath(path)),
            env=_child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        output, errors = await child.communicate()
        if child.returncode != 0:
            raise OSError(_describe(child.returncode, errors))
        return await asyncio.to_thread(functools.partial(config_from_answer, output, tell=True))
    except _FAILURES as exc:
        log.warning("reading the config in a child process failed (%s); reading it here", exc)
        return await asyncio.to_thread(load_config, path, os.environ if env is None else env)


async def load_answer_file_off_loop(path: str) -> Config:
    """The config of an answer another process saved in `path` (see `save_answer`); that
    process has told the load's warnings."""
    import asyncio

    def read() -> Config:
        return config_from_answer(Path(path).read_bytes(), tell=False)

    return await asyncio.to_thread(read)


def save_answer(answer: bytes, path: str) -> None:
    """Write `answer` so that a reader sees the old file or the new one, never half of one."""
    partial = f"{path}.partial"
    with open(partial, "wb") as file:
        file.write(answer)
    os.replace(partial, path)


def _describe(returncode: int | None, errors: bytes) -> str:
    tail = errors.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    return f"the child exited with {returncode}: {tail[0]}"
