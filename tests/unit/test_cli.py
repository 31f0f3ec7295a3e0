"""The command line, as a person types it: `python -m gateway ...` in a real process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from tests.support.certificates import make_expired_certificate
from tests.support.config import MINIMAL_PRODUCTS


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


def test_hash_key_hashes_a_key_that_begins_with_a_dash() -> None:
    """The admin API's secrets are `secrets.token_urlsafe`, one in 64 of which begins with `-`:
    `gateway hash-key -Xy...` was a usage error ('the following arguments are required: key')
    for them, the key taken for an option."""
    for key in ("-Xy3_k", "--Xy3_k", "-"):
        done = gateway("hash-key", key)
        assert (done.returncode, done.stderr) == (0, ""), key
        assert done.stdout.strip() == hashlib.sha256(key.encode()).hexdigest()
    assert gateway("hash-key", "--", "-Xy3_k").stdout.strip() == (
        hashlib.sha256(b"-Xy3_k").hexdigest()
    )
    assert gateway("hash-key", "--help").stdout.startswith("usage: gateway hash-key")


def test_hash_key_refuses_an_empty_key() -> None:
    """`gateway hash-key "$KEY"` with KEY unset printed the SHA-256 of nothing, which no request
    can present (an empty key is no key): the key made from it was 401 for good, silently."""
    done = gateway("hash-key", "")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "empty" in done.stderr


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


def test_workers_given_on_the_command_line_are_named_so_in_an_error(tmp_path: Path) -> None:
    """`--workers 2` on memory:// was refused as `GATEWAY_WORKERS: ...`, a variable the user
    never set (the flag travels in it to every load of the config)."""
    config = tmp_path / "gateway.yaml"
    config.write_text(MINIMAL_PRODUCTS)
    env = {"GATEWAY_REDIS_URL": "memory://"}
    done = gateway("run", "--config", str(config), "--workers", "2", env=env)
    assert done.returncode == 1
    assert "--workers: server.workers: memory:// storage lives inside one process" in done.stderr
    done = gateway("check", "--config", str(config), env={**env, "GATEWAY_WORKERS": "2"})
    assert "GATEWAY_WORKERS: server.workers: memory:// storage" in done.stdout


_PROBE = """
import importlib.abc, signal, sys

class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "gateway.server":
            held = signal.pthread_sigmask(signal.SIG_BLOCK, [])
            print(sorted(int(s) for s in held & {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}))
            sys.exit(0)
        return None

sys.meta_path.insert(0, Probe())
from gateway.cli import main
main(["run", "--config", sys.argv[1]])
"""


def test_run_holds_stop_and_reload_signals_before_it_imports_the_server(tmp_path: Path) -> None:
    """Importing what serving needs takes ~0.4 s; a SIGTERM or SIGHUP then killed the gateway
    (143, 129) where the README promises a stop with exit 0 or a reload. The probe looks at the
    signal mask as `gateway.server` begins to be imported."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1, 2, 15]"


FIXTURES = Path(__file__).parents[1] / "config"


def test_check_lists_every_issue_and_exits_1_without_a_traceback() -> None:
    """The YAML that went up as a traceback (`!!bool maybe`, a mapping merging itself)."""
    for name, issues in (("bad_tag_unreadable_scalar.yaml", 2), ("bad_merge_of_itself.yaml", 1)):
        done = gateway("check", "--config", str(FIXTURES / name))
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stdout + done.stderr
        assert len(done.stdout.splitlines()) == issues
        assert all(line.startswith(f"{FIXTURES / name}:") for line in done.stdout.splitlines())


def test_check_prints_the_warnings_of_the_load_once_each(tmp_path: Path) -> None:
    """The warnings a load gathers (gateway.config.load_warnings) are told by `check` too."""
    expired = make_expired_certificate(tmp_path / "tls")
    config = tmp_path / "config"
    config.mkdir()
    tls = f"server:\n  tls: {{cert: {expired.cert}, key: {expired.key}}}\n"
    (config / "gateway.yaml").write_text(tls + MINIMAL_PRODUCTS)
    (config / "plans.yml").write_text("plans: {}\n")
    done = gateway("check", "--config", str(config))
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
    assert done.stderr.splitlines() == [
        f"{config}: plans.yml not read: only a folder's *.yaml files are",
        f"the certificate file {expired.cert}: certificate 1 of 1 (CN=localhost) expired on "
        "2020-01-02 00:00:00 UTC: clients that check certificates refuse it",
    ]


def test_run_with_a_config_that_fails_exits_at_once_saying_why_on_stderr(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for config, message in (
        (FIXTURES / "bad_merge_of_itself.yaml", "plans.a.rate.limit: must be an integer"),
        (tmp_path / "missing.yaml", "missing.yaml: no such file or folder"),
        (tmp_path / "empty", "empty: no *.yaml files in this folder"),
    ):
        done = gateway("run", "--config", str(config))
        assert done.returncode == 1
        assert done.stdout == ""
        assert message in done.stderr
        assert "Traceback" not in done.stderr


def test_bad_workers_and_unknown_flags_are_usage_errors(tmp_path: Path) -> None:
    config = Path(__file__).parents[2] / "config"
    for args in (("--workers", "abc"), ("--workers", "1.5"), ("--workers", "-1"), ("--bogus",)):
        done = gateway("run", "--config", str(config), *args)
        assert done.returncode == 2, args
        assert done.stderr and "Traceback" not in done.stderr


def test_output_into_a_reader_that_left_is_no_traceback() -> None:
    """`gateway check --config x | head -1` (or `| grep -q ...`) closes the pipe before the
    rest is printed: Python's BrokenPipeError went up as a traceback on stderr, for `ok` and
    `hash-key` as for the list of issues. The answer stays the exit code, as the shell reads it.
    The reading end is closed before the command starts, so that every write meets it."""
    for args, code in (
        (("check", "--config", str(FIXTURES / "bad_several.yaml")), 1),
        (("check", "--config", str(Path(__file__).parents[2] / "config")), 0),
        (("hash-key", "test"), 0),
    ):
        reader, writer = os.pipe()
        os.close(reader)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "gateway", *args],
                stdout=writer,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            os.close(writer)
        assert (done.returncode, done.stderr) == (code, ""), args
        # Started with no stdout at all (`>&-`): Python's sys.stdout is None then.
        closed = subprocess.run(
            ["sh", "-c", 'exec "$0" "$@" >&-', sys.executable, "-m", "gateway", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (closed.returncode, closed.stderr) == (code, ""), args


def test_a_log_level_that_is_none_stops_the_start_saying_so(tmp_path: Path) -> None:
    """GATEWAY_LOG_LEVEL=verbose was a ValueError traceback from logging.basicConfig."""
    config = Path(__file__).parents[2] / "config"
    done = gateway("run", "--config", str(config), env={"GATEWAY_LOG_LEVEL": "verbose"})
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "GATEWAY_LOG_LEVEL: must be one of debug, info, warning, error, critical, not 'verbose'"
    ]
    # A level in any case is taken: the start goes on to the config (here, one that is missing).
    done = gateway(
        "run", "--config", str(tmp_path / "missing.yaml"), env={"GATEWAY_LOG_LEVEL": "Warning"}
    )
    assert done.returncode == 1
    assert "missing.yaml: no such file or folder" in done.stderr
    assert "GATEWAY_LOG_LEVEL" not in done.stderr


def test_workers_0_counts_the_cpus_the_gateway_may_run_on(tmp_path: Path) -> None:
    """`workers: 0` is one worker per CPU the process may run on (`taskset`, a container's
    cpuset), as nginx's `worker_processes auto` and Go's GOMAXPROCS count: os.cpu_count()
    counted every CPU of the machine, so a gateway pinned to one CPU forked one worker per
    host CPU onto it (and here, on memory://, was refused for needing Redis)."""
    config = tmp_path / "gateway.yaml"
    config.write_text("server:\n  workers: 0\n" + MINIMAL_PRODUCTS)
    one_cpu = min(os.sched_getaffinity(0))
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}),
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")
