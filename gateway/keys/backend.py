"""Where API keys are kept: what the key store asks of a storage, and the in-process one.

Every change is one atomic write that also bumps the storage's version number and announces
the change, so that processes following the storage apply changes in version order (see
`gateway.keys.store`). A write names the record it expects to replace, so two admin calls
changing one key at once cannot undo each other: the second is retried on the new record.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

RefusalReason = Literal["name_taken", "secret_taken", "not_found", "changed"]


class WriteRefused(Exception):
    """The storage refused a write: the name or a secret is taken, the key is gone, or it
    changed since it was read."""

    def __init__(self, reason: RefusalReason) -> None:
        super().__init__(reason)
        self.reason: RefusalReason = reason


@dataclass(frozen=True, slots=True)
class KeyWrite:
    name: str
    expected: str | None  # the stored record this write replaces; None: the name must be free
    record: str | None  # the new record; None deletes the key
    add_digests: tuple[str, ...] = ()  # secrets this key gets (refused if another key has one)
    remove_digests: tuple[str, ...] = ()  # secrets it gives up


class Change(NamedTuple):
    """One write as followers learn of it."""

    version: int
    name: str
    record: str | None  # None: deleted
    # The storage's epoch, when this change began the store (its version 1; see
    # `KeyStore._apply_pending`).
    begins: str | None = None


class Missed(NamedTuple):
    """What a follower at some version missed: the storage's version and epoch (a store
    emptied and begun again has a new one), and the keys changed since, oldest change first;
    None when the storage's log of recent changes does not reach back that far."""

    version: int
    epoch: str
    names: list[str] | None


class Subscription(Protocol):
    async def next(self, within: float) -> Change | None:
        """The next announced change, or None when none came within `within` seconds."""
        ...

    def moved(self) -> bool:
        """Whether the server it listens on is no longer the storage's master (a Sentinel
        failover left it on the old one): announcements no longer come, or come late."""
        ...


class KeyBackend(Protocol):
    shared: bool  # False: the keys live in this process only (nothing to follow)

    async def write(self, write: KeyWrite) -> tuple[int, str | None]:
        """Apply `write` atomically; the storage's new version, and its epoch when this write
        began the store (else None). WriteRefused."""
        ...

    async def read(self, name: str) -> str | None: ...

    async def state(self) -> tuple[int, str]:
        """The storage's version and epoch."""
        ...

    async def missed(self, after: int) -> Missed:
        """What changed after version `after`."""
        ...

    async def read_many(self, names: list[str]) -> list[str | None]: ...

    def load(self) -> AsyncIterator[list[tuple[str, str]]]:
        """Every stored record, in batches of (name, record)."""
        ...

    def subscribe(self) -> AbstractAsyncContextManager[Subscription]:
        """Changes announced from when the context is entered (it returns once subscribed)."""
        ...

    async def close(self) -> None: ...


class MemoryKeyBackend:
    """Keys in this process (`memory://`): they live as long as the process does."""

    shared = False

    def __init__(self) -> None:
        self._records: dict[str, str] = {}
        self._owners: dict[str, str] = {}  # digest -> key name
        self._version = 0

    async def write(self, write: KeyWrite) -> tuple[int, str | None]:
        current = self._records.get(write.name)
        if write.expected is None and current is not None:
            raise WriteRefused("name_taken")
        if write.expected is not None and current != write.expected:
            raise WriteRefused("not_found" if current is None else "changed")
        for digest in write.add_digests:
            if self._owners.get(digest, write.name) != write.name:
                raise WriteRefused("secret_taken")
        for digest in write.remove_digests:
            if self._owners.get(digest) == write.name:
                del self._owners[digest]
        for digest in write.add_digests:
            self._owners[digest] = write.name
        if write.record is None:
            del self._records[write.name]
        else:
            self._records[write.name] = write.record
        self._version += 1
        return self._version, None

    async def read(self, name: str) -> str | None:
        return self._records.get(name)

    async def state(self) -> tuple[int, str]:
        return self._version, ""

    async def missed(self, after: int) -> Missed:
        return Missed(self._version, "", None)  # nobody follows a store of one process

    async def read_many(self, names: list[str]) -> list[str | None]:
        return [self._records.get(name) for name in names]

    async def load(self) -> AsyncIterator[list[tuple[str, str]]]:
        yield list(self._records.items())

    def subscribe(self) -> AbstractAsyncContextManager[Subscription]:
        raise NotImplementedError("memory:// has one process: there is nothing to follow")

    async def close(self) -> None:
        return None
