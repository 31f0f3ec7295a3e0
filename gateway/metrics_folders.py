"""The workers' metrics folders: which are a live gateway's, and which a killed one left.

A gateway with workers keeps their counts in a folder of its own
(`metrics.prepare_multiprocess_dir`) and removes it when it stops; a gateway killed outright
cannot.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil

# A folder of this process's own is marked by an owner file that it keeps locked (flock) until
# it exits, however it exits: a folder whose lock anyone can take is a killed gateway's.
FOLDER_PREFIX = "gateway-metrics-"
OWNER_FILE = ".owner"
_owner_lock: int | None = None  # its descriptor, open for the life of this process


def hold_owner_lock(directory: str) -> None:
    global _owner_lock
    # Locked under another name first, then renamed: an owner file never exists unlocked,
    # which another gateway's sweep would take for a dead one.
    claiming = os.path.join(directory, OWNER_FILE + ".new")
    fd = os.open(claiming, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(claiming, os.path.join(directory, OWNER_FILE))
    except OSError:
        os.close(fd)
        raise
    if _owner_lock is not None:
        os.close(_owner_lock)  # an earlier folder of this process's, given up
    _owner_lock = fd


def remove_abandoned_folders(within: str) -> list[str]:
    """Remove the metrics folders in `within` that killed gateways left (a stopped one removes
    its own): each holds a few mmap'd files of counts (64 KiB each, sparse) that nobody reads
    any more, and a restart loop under SIGKILL would pile them up without end. Only folders with
    an owner file that nobody holds locked go; those without one (an older gateway's, or one
    being made) stay. Returns the folders removed."""
    removed = []
    for folder in glob.glob(os.path.join(glob.escape(within), FOLDER_PREFIX + "*")):
        try:
            fd = os.open(os.path.join(folder, OWNER_FILE), os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live gateway's
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed
