"""The command line, as a person types it: `python -m gateway ...` in a real process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def gateway(
    *args: str | bytes, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_hash_key_hashes_the_bytes_given_even_when_they_are_not_utf8() -> None:
    """As the proxy hashes the bytes a client sends; it was a traceback."""
    done = gateway("hash-key", b"schl\xfcssel")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == hashlib.sha256(b"schl\xfcssel").hexdigest()
    assert gateway("hash-key", "test").stdout.strip() == hashlib.sha256(b"test").hexdigest()


def test_an_empty_config_path_is_an_error_not_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "stray.yaml").write_text("products: {}\n")
    for done in (
        gateway("check", "--config", ""),
        gateway("check", env={"GATEWAY_CONFIG": ""}),
    ):
        assert (done.returncode, done.stdout.strip()) == (
            1,
            "--config: is empty (or GATEWAY_CONFIG is)",
        )


def test_too_many_workers_are_refused_before_anything_forks() -> None:
    config = Path(__file__).parents[2] / "config"
    done = gateway("run", "--config", str(config), "--workers", "100000")
    assert done.returncode == 2
    assert "--workers: must be 0 to 256" in done.stderr
