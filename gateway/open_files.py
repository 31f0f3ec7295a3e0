"""The process's limit of open files, raised to what the system allows.

Every client connection holds a file descriptor, and so does every upstream connection while
it is in use or kept alive: a gateway serving C clients needs about 2C of them. Linux starts
processes with a soft limit of 1,024 unless told otherwise (systemd services, and containers
under containerd 2 and recent Docker: soft 1,024, hard 524,288), and at that limit new clients
are accepted and closed at once by the event loop (libuv's way out of a busy loop), upstream
connections fail (502) and config files cannot be read, with ~500 clients connected. The soft
limit is only a default that a process may raise up to the hard one, as Go programs do at
start; the gateway does the same, once, before it forks its workers (which inherit it).
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

log = logging.getLogger("gateway.server")

# Linux refuses a soft limit above fs.nr_open (1,048,576 by default), even when the hard limit
# says "unlimited".
_NR_OPEN = Path("/proc/sys/fs/nr_open")


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise the soft RLIMIT_NOFILE to the hard one; (before, after) when it was raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        try:
            target = int(_NR_OPEN.read_text())
        except (OSError, ValueError):
            target = 1_048_576
    if soft != resource.RLIM_INFINITY and soft >= target:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        # Another system's rule (macOS caps it at OPEN_MAX): the process goes on with its own.
        log.info("open files: the limit stays at %d (raising it to %d: %s)", soft, target, exc)
        return None
    log.info("open files: the limit was raised from %d to %d", soft, target)
    return soft, target
