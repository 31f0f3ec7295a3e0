"""Where the Redis storage keeps things, and the Lua scripts that keep them there.

Every key of one subscription ("<key name>:<product>") carries the subject as its hash tag,
so that all of them live in one Redis Cluster slot and one script may touch them together:

    gw:{<subject>}:rate                 sorted set: admission times in the rate window
    gw:{<subject>}:q:<period start>     hash: used, credit, born (the quota of one period);
                                        `:q:<period start>:<kind>` for a period that begins
                                        together with a longer kind's (`quota_key`)
    gw:{<subject>}:d:<YYYY-MM-DD>       hash: born, r:<plan>, u:<plan> (one UTC day's history)
    gw:{<subject>}:credit:<key>         string: the units a credit with that idempotency key
                                        added (kept a day)

The sets that name the subscriptions with history live outside them
(`gateway.limits.redis_registry`).
"""

from __future__ import annotations

import functools
import hashlib
from importlib.resources import files
from typing import Any
from zoneinfo import ZoneInfo

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from gateway.config.model import QuotaPeriod, QuotaRule
from gateway.limits.base import day_text
from gateway.limits.periods import quota_period
from gateway.limits.resp import pack

AnyRedis = Redis | RedisCluster


class Script:
    """A Lua script shipped in a package of the gateway, and its SHA1, for EVALSHA."""

    def __init__(self, name: str, package: str = "gateway.limits") -> None:
        self.text = files(package).joinpath(name).read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.text.encode("utf-8")).hexdigest()


HIT = Script("hit.lua")
SETTLE = Script("settle.lua")
CREDIT = Script("credit.lua")
RESET = Script("reset.lua")


def rate_key(subject: str) -> str:
    return f"gw:{{{subject}}}:rate"


def quota_key(subject: str, period_start: float, quota: QuotaRule) -> str:
    """The counter of `quota`'s period that begins at `period_start`.

    Periods of different kinds can begin at one instant (Monday the 1st at midnight begins a
    month, a week, a day and an hour), and a subscription whose plan changes kind keeps a count
    per period: so the longest of them has the plain name, and each shorter one its kind after
    it. Only those periods are named apart, so that a gateway of the older layout (the plain
    name for every kind) and this one count every other period in one counter: a rolling
    upgrade starts no count afresh but on such an instant."""
    suffix = _kind_suffix(period_start, quota.per, quota.timezone)
    return f"gw:{{{subject}}}:q:{int(period_start)}{suffix}"


# The kinds whose periods may begin when one of `kind` does, and are longer: a period that
# begins with one of these begins with any longer kind's too (each begins on a boundary of
# the next shorter kind), so these are the ones to look at.
_NEXT_LONGER: dict[str, tuple[QuotaPeriod, ...]] = {
    "second": ("minute",),
    "minute": ("hour",),
    "hour": ("day",),
    "day": ("week", "month"),
    "week": ("month",),
    "month": (),
}


# Once per subscription and period on the request path (RedisLimiter caches its commands), and
# the same few (start, kind, zone) for all subscriptions of a plan.
@functools.lru_cache(maxsize=1024)
def _kind_suffix(period_start: float, kind: QuotaPeriod, zone: ZoneInfo) -> str:
    for longer in _NEXT_LONGER[kind]:
        if quota_period(period_start, longer, zone)[0] == period_start:
            return f":{kind}"
    return ""


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


def pack_evalsha(
    script: Script,
    keys: tuple[str, ...],
    args: tuple[int | str, ...],
    *,
    encoding: str,
    errors: str,
    to_come: int = 0,
) -> bytes:
    """EVALSHA of `script` as RESP (keys and arguments in the client's `encoding`), for the
    hits' own connection; with `to_come`, the count of arguments includes that many more, for
    the caller to append packed."""
    whole = pack(
        b"EVALSHA",
        script.sha.encode("ascii"),
        str(len(keys)).encode("ascii"),
        *(key.encode(encoding, errors) for key in keys),
        *(str(arg).encode(encoding, errors) for arg in (*args, *("",) * to_come)),
    )
    # Each argument to come was packed empty, as `$0\r\n\r\n`: cut for the real one.
    return whole[: len(whole) - len(b"$0\r\n\r\n") * to_come]


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
