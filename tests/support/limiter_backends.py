"""The limit storages a limiter test runs on (memory, a real redis-server, a Redis Cluster, a
Sentinel group), and the rules and hits those tests make.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
import redis.cluster
import redis.crc

from gateway.config.model import QuotaPeriod, QuotaRule, RateRule, StorageConfig
from gateway.limits import Decision, Limiter, create_limiter
from tests.support.redis_servers import RedisSentinelGroup

UTC = ZoneInfo("UTC")


def rate_rule(limit: int, window: float) -> RateRule:
    return RateRule(limit=limit, window=window, per=f"{window}s")


def quota_rule(limit: int, per: QuotaPeriod = "month", tz: ZoneInfo = UTC) -> QuotaRule:
    return QuotaRule(limit=limit, per=per, timezone=tz)


@dataclass
class Backend:
    kind: str
    url: str
    errors: list[str] = field(default_factory=list)
    sentinel: RedisSentinelGroup | None = None

    def limiter(self, timeout: float = 2.0) -> Limiter:
        return create_limiter(StorageConfig(url=self.url, timeout=timeout), self.errors.append)

    def inspector(self) -> Any:
        """A plain synchronous client, to look at the keys the limiter wrote."""
        if self.kind == "cluster":
            host_port = self.url.removeprefix("redis+cluster://")
            host, port = host_port.split(":")
            return redis.cluster.RedisCluster(host=host, port=int(port), socket_timeout=5)
        if self.kind == "sentinel":
            assert self.sentinel is not None
            return redis.Redis(port=self.sentinel.master_port(), socket_timeout=5)
        return redis.Redis.from_url(self.url, socket_timeout=5)


def redis_backend_of(request: pytest.FixtureRequest, kind: str) -> Backend:
    # Servers are asked for lazily, so `-k memory` starts no Redis at all.
    if kind == "sentinel":
        group: RedisSentinelGroup = request.getfixturevalue("redis_sentinel")
        return Backend("sentinel", group.url, sentinel=group)
    fixture = "redis_server" if kind == "redis" else "redis_cluster"
    return Backend(kind, request.getfixturevalue(fixture).url)


async def hits(limiter: Limiter, subject: str, count: int, **rules: Any) -> list[Decision]:
    return [await limiter.hit(subject, rules.get("rate"), rules.get("quota")) for _ in range(count)]
