"""Which Python runs the gateway in the bench: one built the way the image's is.

The image (Dockerfile, `FROM python:3.11-slim`) runs a CPython built with profile-guided and
link-time optimisation, as Linux distributions build theirs too. A CPython compiled without
them (what pyenv builds unless asked, and what `make` uses when it is first on PATH) runs the
same Python code much slower: on the bench machine a pure-Python loop took 2.4x as long, and
the gateway needed 1.2-1.3x the CPU per request (bench/PROFILE.md, "Session 4"). Measuring
the gateway as it ships means measuring it under an interpreter like the image's; so the
bench times each Python 3.11+ it can find on a small loop, runs the gateway under the fastest
(in a venv of its own with the gateway's dependencies, kept under ~/.cache/gateway-bench),
and prints both figures. `--python PATH` picks one instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from harness import REPO, BenchError

# The loop every candidate is timed on (µs per run, best of five).
_CALIBRATION = (
    "import timeit;"
    "print(min(timeit.repeat('sum(range(1000))', number=2000, repeat=5)) / 2000 * 1e6)"
)
_NAMES = ("python3.11", "python3.12", "python3.13", "python3")
_PLACES = ("/usr/bin", "/usr/local/bin")


@dataclass(frozen=True)
class Interpreter:
    path: str  # the python to start the gateway with (in a venv with its dependencies)
    base: str  # the interpreter that venv was made from
    version: str
    loop_us: float  # µs per sum(range(1000)): lower is a faster build

    def describe(self) -> str:
        return f"CPython {self.version} ({self.base}; sum(range(1000)) in {self.loop_us:.1f} µs)"


def _probe(python: str) -> tuple[str, str, float] | None:
    """(real path, version, loop µs) of `python`, or None if it is not a usable 3.11+."""
    try:
        done = subprocess.run(
            [
                python,
                "-c",
                "import sys, os; print(os.path.realpath(sys.executable));"
                "print('%d.%d.%d' % sys.version_info[:3]); print(sys.version_info >= (3, 11))",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        real, version, recent = done.stdout.split()
        if recent != "True":
            return None
        timed = subprocess.run(
            [python, "-c", _CALIBRATION], capture_output=True, text=True, timeout=60, check=True
        )
        return real, version, float(timed.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def running_python() -> Interpreter:
    """The interpreter running the bench itself (the checkout's .venv under `make bench`)."""
    probed = _probe(sys.executable)
    if probed is None:
        raise BenchError(f"{sys.executable} cannot be timed")
    real, version, loop_us = probed
    return Interpreter(sys.executable, real, version, loop_us)


def candidates() -> list[str]:
    found = [sys.executable]
    for name in _NAMES:
        which = shutil.which(name)
        if which:
            found.append(which)
        found += [f"{place}/{name}" for place in _PLACES if Path(f"{place}/{name}").exists()]
    return found


def fastest_python(cache: Path, chosen: str | None = None) -> Interpreter:
    """The interpreter to run the gateway with: `chosen`, or the fastest build found."""
    own = running_python()
    probed: dict[str, tuple[str, float]] = {}
    for python in [chosen] if chosen else candidates():
        found = _probe(python)
        if found is not None:
            real, version, loop_us = found
            probed.setdefault(real, (version, loop_us))
    if not probed:
        raise BenchError(f"{chosen} is not a Python 3.11 or newer")
    base, (version, loop_us) = min(probed.items(), key=lambda item: item[1][1])
    if base == own.base:
        return own
    try:
        return Interpreter(str(_venv_for(base, cache)), base, version, loop_us)
    except BenchError as exc:
        if chosen:
            raise
        # The bench still runs, under its own interpreter, and says why.
        print(f"{exc}\nthe gateway runs under {own.describe()} instead", flush=True)
        return own


def _venv_for(base: str, cache: Path) -> Path:
    """A venv of `base` with the gateway's dependencies (not the gateway: the bench puts the
    measured checkout on PYTHONPATH), made once per interpreter and dependency list."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = sorted(project["dependencies"])
    tag = hashlib.sha256("\n".join([base, *requirements]).encode()).hexdigest()[:12]
    venv = cache / f"python-{tag}"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    print(f"making a venv of {base} for the gateway in {venv} ...", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    try:
        subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *requirements],
            check=True,
            capture_output=True,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(venv, ignore_errors=True)
        output = (exc.stderr or b"").decode(errors="replace")[-2000:]
        raise BenchError(
            f"could not make a venv of {base} (on Debian: apt-get install python3-venv), "
            f"or pass --python: {output}"
        ) from exc
    return python
