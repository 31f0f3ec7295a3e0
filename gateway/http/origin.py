"""What the HTTP client needs to know of an upstream: where it is and how long it may take.

The config's `Upstream` (gateway/config/model.py) has these attributes and more (its URL as
written, its base path); the client takes anything that has these, so that the transport layer
depends on no type of the gateway's domain.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Origin"]


class Origin(Protocol):
    @property
    def scheme(self) -> str:
        """ "http" or "https"."""

    @property
    def host(self) -> str:
        """A name or an IP address, without brackets."""

    @property
    def port(self) -> int: ...

    @property
    def connect_timeout(self) -> float:
        """Seconds to open a connection (and finish its TLS handshake)."""

    @property
    def timeout(self) -> float:
        """Seconds the upstream has to answer, or to take more of a request body."""
