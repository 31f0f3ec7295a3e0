"""Where the Redis storage keeps things, and the Lua scripts that keep them there.

Every key of one subscription ("<key name>:<product>") carries the subject as its hash tag,
so that all of them live in one Redis Cluster slot and one script may touch them together:

    gw:{<subject>}:rate                 sorted set: admission times in the rate window
    gw:{<subject>}:q:<period start>     hash: used, credit, born (the quota of one period)
    gw:{<subject>}:d:<YYYY-MM-DD>       hash: born, r:<plan>, u:<plan> (one UTC day's history)
    gw:{<subject>}:credit:<key>         string: the units a credit with that idempotency key
                                        added (kept a day)

The sets that name the subscriptions with history live outside them
(`gateway.limits.redis_registry`).
"""

from __future__ import annotations

import hashlib
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from gateway.limits.base import day_text

AnyRedis = Redis | RedisCluster


class Script:
    """A Lua script shipped in a package of the gateway, and its SHA1, for EVALSHA."""

    def __init__(self, name: str, package: str = "gateway.limits") -> None:
        self.text = files(package).joinpath(name).read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.text.encode("utf-8")).hexdigest()


HIT = Script("hit.lua")
REFUND = Script("refund.lua")
CREDIT = Script("credit.lua")
RESET = Script("reset.lua")


def rate_key(subject: str) -> str:
    return f"gw:{{{subject}}}:rate"


def quota_key(subject: str, period_start: float) -> str:
    return f"gw:{{{subject}}}:q:{int(period_start)}"


def credit_once_key(subject: str, idempotency_key: str) -> str:
    return f"gw:{{{subject}}}:credit:{idempotency_key}"


def day_key(subject: str, day: int) -> str:
    return f"gw:{{{subject}}}:d:{day_text(day)}"


def packed_cost(cost: int) -> bytes:
    """`cost` as one RESP bulk string."""
    text = str(cost).encode("ascii")
    return b"$%d\r\n%b\r\n" % (len(text), text)


# The hit script's last argument, `cost`, packed in RESP (appended to a packed command), ready
# for the costs routes usually declare; `packed_cost` makes the others.
PACKED_COSTS: dict[int, bytes] = {cost: packed_cost(cost) for cost in range(1, 101)}


async def run_script(
    client: AnyRedis, script: Script, keys: tuple[str, ...], args: tuple[int | str, ...]
) -> Any:
    """EVALSHA, or EVAL when the node does not know the script (which it then keeps)."""
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        # The node lost its script cache (restart, failover): NOSCRIPT means the script did
        # not run, so running it again is safe. EVAL goes to the node of the keys alone,
        # where a SCRIPT LOAD on a cluster goes to every master, and fails while any is down.
        return await client.eval(script.text, len(keys), *keys, *args)
