"""Which workers' metrics folders a starting gateway removes: those of gateways that were
killed (nobody holds their owner lock), never a live one's, nor one without an owner file."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from gateway.metrics_folders import FOLDER_PREFIX, OWNER_FILE, remove_abandoned_folders

# A gateway's side, in a process of its own: make a folder, hold its lock, say where, wait.
_OWNER = """
import sys, tempfile
from gateway.metrics_folders import FOLDER_PREFIX, hold_owner_lock
folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=sys.argv[1])
hold_owner_lock(folder)
open(folder + "/counter_1.db", "wb").close()
print(folder, flush=True)
sys.stdin.read()
"""


def start_owner(within: Path) -> tuple[subprocess.Popen[str], Path]:
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(within)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    return owner, Path(owner.stdout.readline().strip())


def stop(owner: subprocess.Popen[str], how: signal.Signals) -> None:
    owner.send_signal(how)
    owner.wait(timeout=10)
    for pipe in (owner.stdin, owner.stdout):
        if pipe is not None:
            pipe.close()


def test_a_killed_gateways_folder_goes_and_a_live_ones_stays(tmp_path: Path) -> None:
    killed, killed_folder = start_owner(tmp_path)
    live, live_folder = start_owner(tmp_path)
    try:
        stop(killed, signal.SIGKILL)
        assert (killed_folder / "counter_1.db").exists()
        assert remove_abandoned_folders(str(tmp_path)) == [str(killed_folder)]
        assert not killed_folder.exists()
        assert (live_folder / "counter_1.db").exists()
        assert remove_abandoned_folders(str(tmp_path)) == []
    finally:
        stop(live, signal.SIGTERM)
    assert remove_abandoned_folders(str(tmp_path)) == [str(live_folder)]


def test_folders_without_an_owner_file_stay(tmp_path: Path) -> None:
    """An older gateway's folder, one being made (its lock file not renamed yet), and a folder
    that is not a gateway's at all."""
    older = tmp_path / f"{FOLDER_PREFIX}older"
    older.mkdir()
    (older / "counter_1.db").write_bytes(b"")
    making = tmp_path / f"{FOLDER_PREFIX}making"
    making.mkdir()
    (making / f"{OWNER_FILE}.new").write_bytes(b"")
    other = tmp_path / "someone-else"
    other.mkdir()
    (other / OWNER_FILE).write_bytes(b"")
    assert remove_abandoned_folders(str(tmp_path)) == []
    assert older.exists() and making.exists() and other.exists()
