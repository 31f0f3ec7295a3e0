"""The state one worker serves from: the current config snapshot and the long-lived resources.

A reload builds a new `Snapshot` off the hot path and swaps the reference in one assignment, so a
request sees either the old config or the new one, never a mix. The limiter and the upstream pools
outlive snapshots (counters survive a reload).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.config.model import Config

if TYPE_CHECKING:
    from gateway.auth import KeyIndex
    from gateway.limits.base import Limiter
    from gateway.proxy import UpstreamPool
    from gateway.routing import RouteTable


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    routes: RouteTable
    keys: KeyIndex
    key_header: bytes  # auth.header, lower-cased, as the request's raw header lines hold it


@dataclass(slots=True)
class Runtime:
    snapshot: Snapshot
    limiter: Limiter
    upstreams: UpstreamPool
    storage_ok: bool = True  # last known health of the limit storage, for /readyz
    extra: dict[str, object] = field(default_factory=dict)
