"""Reading a config off the event loop: a child process for a big one, the same answers."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.config.isolated import (
    CHILD_FROM_BYTES,
    answer_for,
    config_from_answer,
    load_config_off_loop,
    read_config_isolated,
)
from tests.support.certificates import make_certificate

PRODUCTS = """\
products:
  shop:
    upstream: {url: "http://127.0.0.1:9000"}
    routes:
      - path: /shop/{rest:path}
plans:
  free: {rate: {limit: 5, per: second}}
"""


def big_config(directory: Path, keys: int, *, broken_at: int | None = None) -> Path:
    """A folder with `keys` keys in keys.yaml; `broken_at`: that key names an unknown plan."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "api.yaml").write_text(PRODUCTS)
    lines = ["keys:"]
    for index in range(keys):
        digest = hashlib.sha256(f"secret-{index}".encode()).hexdigest()
        plan = "gold" if index == broken_at else "free"
        lines += [
            f"  - name: customer-{index}",
            f"    key_sha256: {digest}",
            f"    plans: {{shop: {plan}}}",
        ]
    (directory / "keys.yaml").write_text("\n".join(lines) + "\n")
    assert (directory / "keys.yaml").stat().st_size >= CHILD_FROM_BYTES
    return directory


def test_a_big_config_read_in_a_child_equals_one_read_here(tmp_path: Path) -> None:
    path = big_config(tmp_path, 3_000)
    assert read_config_isolated(path, env={})[1] == load_config(path, env={})


def test_a_process_with_threads_starts_a_new_python_rather_than_fork(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = big_config(tmp_path, 3_000)

    def no_fork() -> int:
        raise AssertionError("forked with threads around")

    monkeypatch.setattr("gateway.config.isolated.threading.active_count", lambda: 2)
    monkeypatch.setattr("gateway.config.isolated.os.fork", no_fork)
    assert read_config_isolated(path, env={})[1] == load_config(path, env={})


def test_a_big_invalid_config_reports_the_same_issues(tmp_path: Path) -> None:
    path = big_config(tmp_path, 3_000, broken_at=2_500)
    with pytest.raises(ConfigError) as here:
        load_config(path, env={})
    with pytest.raises(ConfigError) as isolated:
        read_config_isolated(path, env={})[1]
    assert isolated.value.issues == here.value.issues
    # The bad key's plan is on line 1 + 3 * 2500 + 3 of keys.yaml.
    assert [str(issue) for issue in isolated.value.issues] == [
        f"{path / 'keys.yaml'}:7504: keys[2500].plans.shop: unknown plan 'gold' (plans: free)"
    ]


def test_without_a_child_the_config_is_read_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = big_config(tmp_path, 3_000)

    def no_fork() -> int:
        raise OSError("no fork here")

    monkeypatch.setattr("gateway.config.isolated.os.fork", no_fork)
    monkeypatch.setattr("gateway.config.isolated.sys.executable", str(tmp_path / "no-python"))
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        assert read_config_isolated(path, env={})[1] == load_config(path, env={})
    assert "reading the config in a child process failed" in caplog.text


async def test_reading_a_big_config_leaves_the_event_loop_free(tmp_path: Path) -> None:
    """10,000 keys take the better part of a second to parse and check; parsed on the event
    loop (as reloads once were) that second would be the loop's worst delay."""
    path = big_config(tmp_path, 10_000)
    delays: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            delays.append(time.perf_counter() - before - 0.005)

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    config = await load_config_off_loop(path, env={})
    took = time.perf_counter() - started
    done.set()
    await ticker
    assert len(config.keys) == 10_000
    # Loose for a busy 2-core machine; the loop still went round many times meanwhile.
    assert max(delays) < 0.25, (max(delays), took)
    assert len(delays) > took / 0.05


@pytest.mark.parametrize("keys", [1, 3_000], ids=["in-process", "child"])
def test_a_tls_config_crosses_over_with_a_context_built_from_its_files(
    tmp_path: Path, keys: int
) -> None:
    """An SSLContext cannot be pickled: it is built again from the files on arrival."""
    certificate = make_certificate(tmp_path / "tls")
    path = big_config(tmp_path / "config", keys) if keys > 1 else tmp_path / "config"
    path.mkdir(exist_ok=True)
    (path / "api.yaml").write_text(PRODUCTS)
    (path / "server.yaml").write_text(
        f"server: {{tls: {{cert: {certificate.cert}, key: {certificate.key}}}}}\n"
    )
    config = read_config_isolated(path, env={})[1]
    assert config == load_config(path, env={})
    assert config.server.tls is not None
    assert isinstance(config.server.tls.context, ssl.SSLContext)


def test_a_tls_context_that_cannot_be_built_again_is_a_config_error(tmp_path: Path) -> None:
    certificate = make_certificate(tmp_path / "tls")
    path = tmp_path / "config"
    path.mkdir()
    (path / "api.yaml").write_text(PRODUCTS)
    (path / "server.yaml").write_text(
        f"server: {{tls: {{cert: {certificate.cert}, key: {certificate.key}}}}}\n"
    )
    answer = answer_for(path, {})
    certificate.key.unlink()  # gone between the check and the arrival of the answer
    with pytest.raises(ConfigError) as missing:
        config_from_answer(answer, tell=True)
    assert [issue.path for issue in missing.value.issues] == ["server.tls.key"]
