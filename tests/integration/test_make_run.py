"""`make run` (examples/run_with_upstream.py): the example upstream, then the gateway in front."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.operations import wait_for
from tests.support.paths import REPO_ROOT
from tests.support.sockets import free_ports

LAUNCHER = REPO_ROOT / "examples" / "run_with_upstream.py"


def demo_config(tmp_path: Path) -> tuple[Path, int, int]:
    """The repository's config/ on free ports: (folder, proxy port, upstream port)."""
    folder = tmp_path / "config"
    shutil.copytree(REPO_ROOT / "config", folder)
    proxy, admin, upstream = free_ports(3)
    for file in folder.glob("*.yaml"):
        text = file.read_text()
        text = text.replace("127.0.0.1:8080", f"127.0.0.1:{proxy}")
        text = text.replace("127.0.0.1:9090", f"127.0.0.1:{admin}")
        text = text.replace("127.0.0.1:9000", f"127.0.0.1:{upstream}")
        file.write_text(text)
    return folder, proxy, upstream


def launch(folder: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(LAUNCHER), "--config", str(folder)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: see `stop`
    )


def stop(launcher: subprocess.Popen[str]) -> None:
    """Kill the launcher and whatever it started (its gateway and upstreams, which hold its
    stderr open), when a test failed before they stopped on their own."""
    if launcher.returncode is None:  # not reaped yet, so its group's id is still its own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()


def status_of(url: str) -> int | None:
    request = urllib.request.Request(url, headers={"X-API-Key": "prod-key-456"})
    try:
        with urllib.request.urlopen(request, timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        return int(refused.code)
    except OSError:
        return None


def test_make_run_serves_the_quick_start_through_the_example_upstream(tmp_path: Path) -> None:
    folder, proxy, upstream = demo_config(tmp_path)
    launcher = launch(folder)
    try:
        url = f"http://127.0.0.1:{proxy}/soccer/v4/en/competitions/sr:competition:17/info.json"
        assert wait_for(lambda: status_of(url), 30, "the gateway to answer") == 200
        launcher.send_signal(signal.SIGTERM)
        _, errors = launcher.communicate(timeout=30)
        assert launcher.returncode == 0, errors
    finally:
        stop(launcher)
    # The example upstream went with it.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", upstream)) != 0


def test_make_run_stops_when_the_example_upstream_port_is_taken(tmp_path: Path) -> None:
    folder, proxy, upstream = demo_config(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", upstream))
        holder.listen(8)
        launcher = launch(folder)
        try:
            _, errors = launcher.communicate(timeout=30)
        finally:
            stop(launcher)
    assert launcher.returncode == 1
    assert f"port {upstream} is in use" in errors
    # No gateway was started in front of whatever held the port.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", proxy)) != 0
