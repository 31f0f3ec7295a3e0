"""The environment's part in a configuration: GATEWAY_REDIS_URL, GATEWAY_WORKERS and
GATEWAY_ADMIN_TOKEN over the file's values, each mistake named by its variable, and the storage
URL forms they may hold."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.config import Address, load_config
from gateway.config.storage_url import (
    ClusterUrl,
    SentinelUrl,
    parse_cluster_url,
    parse_sentinel_url,
)
from tests.support.config import MINIMAL_PRODUCTS, issues_of, write_config_file


def test_redis_url_from_the_environment_wins(tmp_path: Path) -> None:
    # Four workers on memory:// would be refused; the environment's Redis makes them valid.
    path = write_config_file(tmp_path, "server: {workers: 4}\nstorage: {url: memory://}\n")
    config = load_config(path, env={"GATEWAY_REDIS_URL": "redis+cluster://10.0.0.1:7000"})
    assert config.storage.url == "redis+cluster://10.0.0.1:7000"
    assert config.server.workers == 4


def test_workers_from_the_environment_are_the_count_judged(tmp_path: Path) -> None:
    """What `gateway run --workers N` sets: a file's `workers: 2` on memory:// was refused
    though one worker was asked for."""
    path = write_config_file(tmp_path, "server: {workers: 2}\nstorage: {url: memory://}\n")
    assert load_config(path, env={"GATEWAY_WORKERS": "1"}).server.workers == 1
    assert issues_of(path) == [
        f"{path}:1: server.workers: memory:// storage lives inside one process; 2 workers need "
        "redis:// storage (storage.url or GATEWAY_REDIS_URL)"
    ]
    alone = write_config_file(tmp_path, "")  # no server section: memory:// and one worker
    assert issues_of(alone, env={"GATEWAY_WORKERS": "3"}) == [
        "GATEWAY_WORKERS: server.workers: memory:// storage lives inside one process; 3 workers "
        "need redis:// storage (storage.url or GATEWAY_REDIS_URL)"
    ]
    redis = {"GATEWAY_REDIS_URL": "redis://10.0.0.1"}
    assert load_config(alone, env={**redis, "GATEWAY_WORKERS": " 3 "}).server.workers == 3
    for bad in ("-1", "many", "257", "2.5"):
        assert issues_of(alone, env={**redis, "GATEWAY_WORKERS": bad}) == [
            "GATEWAY_WORKERS: server.workers: must be a whole number from 0 to 256"
        ]
    # The file's own value is still checked.
    path.write_text("server: {workers: many}\n" + MINIMAL_PRODUCTS, encoding="utf-8")
    assert issues_of(path, env={"GATEWAY_WORKERS": "1"}) == [
        f"{path}:1: server.workers: must be an integer"
    ]


def test_bad_redis_url_in_the_environment_names_the_variable(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, "storage: {url: memory://}\n")
    assert issues_of(path, env={"GATEWAY_REDIS_URL": "redis://:99999"}) == [
        "GATEWAY_REDIS_URL: storage.url: has an invalid port"
    ]
    assert issues_of(path, env={"GATEWAY_REDIS_URL": "localhost:6379"}) == [
        "GATEWAY_REDIS_URL: storage.url: must start with one of memory://, redis://, "
        "rediss://, redis+cluster://, rediss+cluster://, redis+sentinel://, rediss+sentinel://"
    ]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/mymaster/2",
            SentinelUrl((("10.0.0.1", 26379), ("10.0.0.2", 26380)), "mymaster", db=2),
        ),
        (
            # A Sentinel without a port is on Sentinel's own 26379.
            "rediss+sentinel://app:s%40cret@sentinel-a,[::1]:26400/cache",
            SentinelUrl(
                (("sentinel-a", 26379), ("::1", 26400)),
                "cache",
                tls=True,
                username="app",
                password="s@cret",
            ),
        ),
    ],
)
def test_sentinel_url_parts(url: str, expected: SentinelUrl) -> None:
    assert parse_sentinel_url(url) == expected


def test_a_cluster_url_may_name_several_nodes(tmp_path: Path) -> None:
    """So that a gateway can start while the one node its URL named is down (an audit: every
    request 503 after a restart, the cluster healthy)."""
    url = "rediss+cluster://app:s%40cret@10.0.0.1:7000,[::1]:7001,redis-c/0"
    assert parse_cluster_url(url) == ClusterUrl(
        (("10.0.0.1", 7000), ("::1", 7001), ("redis-c", 6379)),
        tls=True,
        username="app",
        password="s@cret",
    )
    path = write_config_file(tmp_path, "server: {workers: 2}\n")
    assert load_config(path, env={"GATEWAY_REDIS_URL": url}).storage.url == url
    path = write_config_file(tmp_path, "")
    for bad, problem in (
        ("redis+cluster://10.0.0.1:7000,bad host", "node 'bad host' must be host:port"),
        ("redis+cluster://10.0.0.1:7000,10.0.0.2:0", "node '10.0.0.2:0': port must be"),
        ("redis+cluster://10.0.0.1:7000,10.0.0.2/1", "Redis Cluster has only database 0"),
        ("redis+cluster://10.0.0.1:7000,10.0.0.2?x=1", "takes no ?options"),
        ("redis+cluster://10.0.0.1:7000,[::1", "node '[::1' must be host:port"),
    ):
        [issue] = issues_of(path, env={"GATEWAY_REDIS_URL": bad})
        assert issue.startswith(f"GATEWAY_REDIS_URL: storage.url: {problem}"), issue


def test_sentinel_url_from_the_environment(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, "server: {workers: 2}\n")
    url = "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster"
    assert load_config(path, env={"GATEWAY_REDIS_URL": url}).storage.url == url
    path = write_config_file(tmp_path, "storage: {url: memory://}\n")
    assert issues_of(path, env={"GATEWAY_REDIS_URL": "redis+sentinel://10.0.0.1/a/b/c"}) == [
        "GATEWAY_REDIS_URL: storage.url: has more than /MASTER/DB after the Sentinels"
    ]


def test_admin_token_from_the_environment(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, "server: {admin_listen: '[::]:9090'}\n")
    assert issues_of(path, env={"GATEWAY_ADMIN_TOKEN": ""}) == [
        f"{path}:1: server.admin_listen: is not a loopback address, so GATEWAY_ADMIN_TOKEN "
        "must be set"
    ]
    config = load_config(path, env={"GATEWAY_ADMIN_TOKEN": "t0ken"})
    assert config.server.admin_token == "t0ken"
    assert config.server.admin_listen == Address("::", 9090)
    # The spaces a shell or a secrets file leaves around it are not part of it...
    assert load_config(path, env={"GATEWAY_ADMIN_TOKEN": " t0ken \n"}).server.admin_token == "t0ken"
    # ... and a token no request could present is refused at the start.
    assert "GATEWAY_ADMIN_TOKEN: is blank" in issues_of(path, env={"GATEWAY_ADMIN_TOKEN": "   "})
    assert issues_of(path, env={"GATEWAY_ADMIN_TOKEN": "t" * 5000}) == [
        "GATEWAY_ADMIN_TOKEN: is longer than 4096 characters"
    ]


@pytest.mark.parametrize("host", ["127.0.0.2", "localhost", "[::1]"])
def test_loopback_admin_needs_no_token(tmp_path: Path, host: str) -> None:
    path = write_config_file(tmp_path, f"server: {{admin_listen: '{host}:9090'}}\n")
    assert load_config(path, env={}).server.admin_token is None


def test_environment_defaults_to_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_REDIS_URL", "rediss://cache.internal:6380/1")
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "from-os")
    config = load_config(write_config_file(tmp_path, ""))
    assert config.storage.url == "rediss://cache.internal:6380/1"
    assert config.server.admin_token == "from-os"


def test_zero_workers_means_one_per_cpu(tmp_path: Path) -> None:
    path = write_config_file(tmp_path, "server: {workers: 0}\nstorage: {url: 'redis://r:6379'}\n")
    assert load_config(path, env={}).server.workers == (os.cpu_count() or 1)
