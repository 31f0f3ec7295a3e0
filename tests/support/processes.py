"""A real `gateway run` process (or supervisor with workers) on free loopback ports."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import IO, Any


class GatewayProcess:
    """`python -m gateway run --config DIR` with its stdout (the access log) kept in a file.

    With `stdout_pipe`, stdout is a pipe that a thread of the test copies into that file, as a
    container runtime reads it: the workers then share one pipe, where a write over PIPE_BUF
    bytes may interleave with another worker's.
    """

    def __init__(
        self,
        config_dir: Path,
        *,
        workers: int | None = None,
        env: dict[str, str] | None = None,
        stdout_pipe: bool = False,
        prefix: list[str] | None = None,
    ) -> None:
        self.config_dir = config_dir
        self.prefix = prefix or []  # a command the gateway's command line is given to
        self.workers = workers
        self.extra_env = env or {}
        self.stdout_pipe = stdout_pipe
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._out = tempfile.NamedTemporaryFile(prefix="gateway-out-", delete=False)  # noqa: SIM115
        self._err = tempfile.NamedTemporaryFile(prefix="gateway-err-", delete=False)  # noqa: SIM115
        # A test that fails before `close` leaves this object to its traceback's cycles, and
        # the collector then finalized the open files in whichever later test collected them:
        # their ResourceWarnings failed that test too (a CI run showed one failure as two).
        # Closed here, whenever this object goes, they warn of nothing.
        weakref.finalize(self, _close_quietly, self._out, self._err)

    def start(
        self,
        proxy_port: int,
        admin_port: int,
        timeout: float = 15.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """Start and wait until both ports answer; `tls`: the proxy port speaks HTTPS and
        this client context trusts its certificate."""
        command = [
            *self.prefix,
            *(sys.executable, "-m", "gateway", "run", "--config", str(self.config_dir)),
        ]
        if self.workers is not None:
            command += ["--workers", str(self.workers)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        stdout = subprocess.PIPE if self.stdout_pipe else self._out
        self.proc = subprocess.Popen(command, stdout=stdout, stderr=self._err, env=env)
        if self.stdout_pipe:
            self._reader = threading.Thread(target=self._copy_stdout, daemon=True)
            self._reader.start()
        self.proxy_port, self.admin_port = proxy_port, admin_port
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=1):
                    pass
                scheme = "http" if tls is None else "https"
                proxy_url = f"{scheme}://127.0.0.1:{proxy_port}/"
                with urllib.request.urlopen(proxy_url, timeout=1, context=tls):
                    pass
            except urllib.error.HTTPError:
                return  # the proxy answered (404 for /): it serves
            except OSError:
                time.sleep(0.05)
                continue
            return
        raise RuntimeError(f"gateway did not start in {timeout}s:\n{self.stderr()}")

    def _copy_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self._out.name, "ab") as sink:
            while chunk := os.read(self.proc.stdout.fileno(), 65536):
                sink.write(chunk)
                sink.flush()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 35.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(10)  # until the pipe's end of file: everything is in the file
        return self.proc.returncode

    def stdout(self) -> str:
        return Path(self._out.name).read_text()

    def stderr(self) -> str:
        return Path(self._err.name).read_text()

    def access_log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout().splitlines() if line.startswith("{")]

    def close(self) -> None:
        self.stop()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        for file in (self._out, self._err):
            file.close()
            os.unlink(file.name)


def _close_quietly(*files: IO[bytes]) -> None:
    for file in files:
        file.close()
        Path(file.name).unlink(missing_ok=True)
