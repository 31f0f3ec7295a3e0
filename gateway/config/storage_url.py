"""What a `storage.url` may be, and the parts of a Sentinel URL.

    memory://
    redis://[user:password@]host:port[/db]          rediss:// for TLS
    redis+cluster://[user:password@]host:port[,host:port...]
                                                    rediss+cluster:// for TLS; any node will do
    redis+sentinel://[user:password@]h1:26379,h2:26379/MASTER[/db]
                                                    rediss+sentinel:// for TLS

A Cluster URL names one node or several: the gateway learns the cluster from the first that
answers, so that it can start while a node it names is down. A Sentinel URL names the
Sentinels (a port left out is Sentinel's 26379) and the name of the master they watch; the
gateway asks them where the master is, and asks again after losing it.
The user and password are those of the Redis servers, not of the Sentinels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

STORAGE_SCHEMES = (
    "memory",
    "redis",
    "rediss",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_PORT = 26379
REDIS_PORT = 6379
_HOST_PORT = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+))(?::(?P<port>\d*))?"
)
_SENTINEL_EXAMPLE = "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster"
_CLUSTER_EXAMPLE = "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None


# Redis numbers its databases with a C int (`databases` in redis.conf, 16 by default): a larger
# number passed `gateway check` and then made every storage call fail.
MAX_DATABASE = 2**31 - 1


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The parts of a redis+sentinel:// URL; `ValueError` saying what is wrong otherwise."""
    scheme, separator, rest = url.strip().partition("://")
    if scheme not in SENTINEL_SCHEMES or not separator:
        raise ValueError(f"must start with {' or '.join(s + '://' for s in SENTINEL_SCHEMES)}")
    location, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    if query:
        raise ValueError("takes no ?options")
    hosts, username, password = _hosts_and_credentials(location)
    sentinels = tuple(_sentinel_address(part) for part in hosts.split(","))
    segments = path.split("/") if path else []
    if not segments or not segments[0]:
        raise ValueError(f"needs the master's name after the Sentinels, e.g. {_SENTINEL_EXAMPLE}")
    if len(segments) > 2:
        raise ValueError("has more than /MASTER/DB after the Sentinels")
    db = 0
    if len(segments) == 2:
        if not (segments[1].isascii() and segments[1].isdigit()):
            raise ValueError(f"database {segments[1]!r} must be a number, e.g. /mymaster/0")
        db = int(segments[1])
        if db > MAX_DATABASE:
            raise ValueError(f"database {db} is larger than any Redis has ({MAX_DATABASE} at most)")
    return SentinelUrl(
        sentinels=sentinels,
        master=unquote(segments[0]),
        db=db,
        tls=scheme == "rediss+sentinel",
        username=username,
        password=password,
    )


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    nodes: tuple[tuple[str, int], ...]  # where to learn the cluster from, in this order
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_cluster_url(url: str) -> ClusterUrl:
    """The parts of a redis+cluster:// URL; `ValueError` saying what is wrong otherwise."""
    scheme, separator, rest = url.strip().partition("://")
    if scheme not in CLUSTER_SCHEMES or not separator:
        raise ValueError(f"must start with {' or '.join(s + '://' for s in CLUSTER_SCHEMES)}")
    location, _, path = rest.partition("/")
    if "?" in rest or "#" in rest:
        raise ValueError("takes no ?options or #fragment (the timeout is storage.timeout)")
    if path.strip("/") not in ("", "0"):
        raise ValueError("Redis Cluster has only database 0")
    hosts, username, password = _hosts_and_credentials(location)
    nodes = tuple(_address(part, "node", REDIS_PORT, _CLUSTER_EXAMPLE) for part in hosts.split(","))
    return ClusterUrl(nodes, scheme == "rediss+cluster", username, password)


def _hosts_and_credentials(location: str) -> tuple[str, str | None, str | None]:
    """`[user[:password]@]hosts`: the hosts, and the user and password percent-decoded."""
    userinfo, at, hosts = location.rpartition("@")
    if not at:
        return hosts, None, None
    user, colon, secret = userinfo.partition(":")
    return hosts, unquote(user) or None, unquote(secret) if colon else None


def _sentinel_address(text: str) -> tuple[str, int]:
    return _address(text, "Sentinel", SENTINEL_PORT, _SENTINEL_EXAMPLE)


def _address(text: str, what: str, default_port: int, example: str) -> tuple[str, int]:
    match = _HOST_PORT.fullmatch(text)
    if not text or match is None:
        raise ValueError(f"{what} {text!r} must be host:port or [ipv6]:port, e.g. {example}")
    port = int(match["port"]) if match["port"] else default_port
    if not 0 < port < 65536:
        raise ValueError(f"{what} {text!r}: port must be between 1 and 65535")
    return match["ipv6"] or match["host"], port


def storage_url_problem(url: str) -> str | None:
    """Why `url` cannot be the limit storage, or None when it can."""
    text = url.strip()
    try:
        parts = urlsplit(text)
    except ValueError:  # urllib's "Invalid IPv6 URL": a '[' or ']' out of place
        for schemes, parse in (
            (SENTINEL_SCHEMES, parse_sentinel_url),
            (CLUSTER_SCHEMES, parse_cluster_url),
        ):
            if text.startswith(tuple(f"{scheme}://" for scheme in schemes)):
                try:
                    parse(text)
                except ValueError as exc:
                    return str(exc)
        return "has a '[' or ']' out of place (an IPv6 host is written redis://[::1]:6379)"
    if parts.scheme not in STORAGE_SCHEMES or not text.startswith(f"{parts.scheme}://"):
        return f"must start with one of {', '.join(s + '://' for s in STORAGE_SCHEMES)}"
    if parts.scheme == "memory":
        return None if text == "memory://" else "memory:// takes nothing after it"
    if parts.scheme in SENTINEL_SCHEMES:
        try:
            parse_sentinel_url(text)
        except ValueError as exc:
            return str(exc)
        return None
    if parts.scheme in CLUSTER_SCHEMES and "," in parts.netloc:
        try:
            parse_cluster_url(text)
        except ValueError as exc:
            return str(exc)
        return None
    try:
        parts.port  # noqa: B018 - urllib checks the port only when it is read
    except ValueError:
        return "has an invalid port"
    if not parts.hostname:
        return f"needs a host, e.g. {parts.scheme}://127.0.0.1:6379"
    if parts.query or parts.fragment:
        # redis-py would take ?options as connection settings, and fail on any it does not
        # know only when the gateway starts; the timeout is storage.timeout.
        return "takes no ?options or #fragment (the timeout is storage.timeout)"
    database = parts.path.strip("/")
    if database:
        if not database.isascii() or not database.isdigit():
            return f"database {database!r} must be a number, e.g. {parts.scheme}://host:6379/0"
        if int(database) > MAX_DATABASE:
            return f"database {database} is larger than any Redis has ({MAX_DATABASE} at most)"
        if "cluster" in parts.scheme and int(database) != 0:
            return "Redis Cluster has only database 0"
    return None
