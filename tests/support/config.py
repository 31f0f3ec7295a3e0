"""Config folders as the gateway reads them: one file for the server and storage, one for the
products, plans and keys."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config

SERVER_FILE = "00-server.yaml"
API_FILE = "10-api.yaml"

WORKER_SERVER = """
server:
  listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:0
  timeouts: {{client_header: {client_header}, client_body: {client_body}, keepalive: 5s,
             websocket_idle: {websocket_idle}}}
  drain_timeout: {drain_timeout}
{tls}storage:
  url: {storage_url}
  timeout: {storage_timeout}
  on_error: {on_error}
"""


def write_config(directory: Path, api: str, *, server: str) -> Path:
    """Writes `server` (the server and storage sections) and `api` (products, plans, keys;
    dedented) into the folder `directory`, made if missing; returns the folder."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SERVER_FILE).write_text(server)
    (directory / API_FILE).write_text(textwrap.dedent(api))
    return directory


def worker_server_yaml(
    *,
    storage_url: str = "memory://",
    storage_timeout: str = "250ms",
    on_error: str = "deny",
    client_header: str = "2s",
    client_body: str = "2s",
    websocket_idle: str = "5s",
    drain_timeout: str = "30s",
    tls: tuple[Path, Path] | None = None,
) -> str:
    """The server file of a worker inside the test's process: both ports chosen by the OS.

    `tls`: (certificate, key) files for HTTPS on the proxy port.
    """
    return WORKER_SERVER.format(
        websocket_idle=websocket_idle,
        drain_timeout=drain_timeout,
        tls="" if tls is None else f"  tls: {{cert: {tls[0]}, key: {tls[1]}}}\n",
        storage_url=storage_url,
        storage_timeout=storage_timeout,
        on_error=on_error,
        client_header=client_header,
        client_body=client_body,
    )


def server_yaml(
    proxy_port: int, admin_port: int, storage_url: str, *, workers: int = 1, extra: str = ""
) -> str:
    """The server file of a `gateway run` process on the ports given."""
    return (
        f"server:\n  listen: 127.0.0.1:{proxy_port}\n  admin_listen: 127.0.0.1:{admin_port}\n"
        f"  workers: {workers}\n"
        f"storage:\n  url: {storage_url}\n  timeout: 250ms\n  on_error: deny\n{extra}"
    )


# The smallest products section a config file can load with (no plans, no keys).
MINIMAL_PRODUCTS = """\
products:
  shop:
    upstream: {url: "http://127.0.0.1:9000"}
    routes:
      - path: /shop
"""


def write_config_file(tmp_path: Path, text: str) -> Path:
    """One config file: `text` with the minimal products that make it loadable."""
    path = tmp_path / "gateway.yaml"
    path.write_text(text + MINIMAL_PRODUCTS, encoding="utf-8")
    return path


def issues_of(path: str | Path, env: dict[str, str] | None = None) -> list[str]:
    """The issues, as `file:line: path: message` lines, of a config that must not load."""
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={} if env is None else env)
    return [str(issue) for issue in caught.value.issues]


def edit_for_sighup_alone(path: Path, text: str) -> None:
    """Write `text` into the config file `path` so that the file watch cannot see the edit: the
    same size (padded with a YAML comment) and the old mtime put back. Only a SIGHUP loads it,
    and once: a watch that saw it too loaded it a second time (each warning of the load said
    twice). `path` must be at least as long as `text` (give it a trailing comment for room)."""
    before = path.stat()
    room = before.st_size - len(text.encode())
    assert room >= 0, f"{path} has {-room} bytes too few for the edit"
    padding = "\n" if room == 1 else "" if room == 0 else "#" + " " * (room - 2) + "\n"
    path.write_text(text + padding)
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
