"""A secret that a key of the config file and an API key both hold.

The rule: the secret is the file key's, as a name in both is (`KeyIndex`). The API refuses to
give an API key a secret of the file (409), but the two still meet: a reload adds a file key
whose secret an API key has; a gateway starts with such a file key and reads the API keys
after its config (much later when the storage is away at the start); another gateway sharing
the storage, whose file lacks the key, hands the secret to an API key. Refusing the reload
would settle only the first of these, and make a config's fate hang on what the storage
holds and answers at that moment (a restart would apply the config the reload refused); the
file winning is the same in every order and every process. The file is what the operator
wrote, and it is the operator who is told: a warning naming both keys, once per config a
worker applies and once when the storage brings it an API key that clashes (by worker 0 alone
of a supervisor's workers, which all find the same: `KeyStore.tells_shared_warnings`).

Requests never look here, and nothing here asks the storage: the clashes are found by walking
the file's secrets once per config (in the thread that builds the key index: 1 ms for 10,000),
the fewer of the file's and the API's after a full read of the API keys, and one API key's
secrets when the storage changes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from gateway.config.instants import format_instant
from gateway.config.model import ApiKey
from gateway.keys.records import KeyRecord
from gateway.keys.table import ApiKeyTable

log = logging.getLogger("gateway.keys")

# Clashes one warning names, the first ones; the rest are counted (a file of 10,000 keys
# copied from the API's must not make 10,000 lines per worker and reload).
_MAX_TOLD = 20


@dataclass(frozen=True, slots=True)
class Clash:
    """The file key `file_key` has a secret (`digest`) of the API key `api_key`: its current
    one (`until` None) or one a rotation left it until `until`."""

    file_key: str
    api_key: str
    digest: str
    until: float | None

    def describe(self) -> str:
        if self.until is None:
            whose = f"the secret of the API key '{self.api_key}'"
        else:
            whose = (
                f"a rotated-out secret of the API key '{self.api_key}' "
                f"(accepted until {format_instant(self.until)})"
            )
        return (
            f"API keys: the file key '{self.file_key}' has {whose}; requests with it are served "
            f"as the file key, never as '{self.api_key}', until one of them has another secret "
            f"(POST /admin/keys/{self.api_key}/rotate, or change the file)"
        )


class SecretClashes:
    """The clashes between one config's file keys and the API keys, each told once."""

    def __init__(
        self,
        by_hash: Mapping[str, ApiKey],
        api_keys: ApiKeyTable,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._by_hash = by_hash
        self._api_keys = api_keys
        self._clock = clock
        self._told: set[tuple[str, str, str]] = set()  # (file key, API key, digest)
        # Found when the config's index is built (a thread, on a reload), told when the
        # config is applied (`tell`).
        self._found = list(self._all(on_loop=False))

    def tell(self) -> None:
        """Tell the clashes found with the config (a worker calls it as it applies it)."""
        found, self._found = self._found, []
        self._tell(found)

    def tell_all(self) -> None:
        """Tell the clashes with the API keys now in the table (after a full read of them)."""
        self._tell(self._all(on_loop=True))

    def tell_record(self, record: KeyRecord) -> None:
        """Tell the clashes of one API key the storage has just brought."""
        if not self._by_hash:
            return
        now = self._clock()
        current = ((record.key_sha256, None),)
        previous = ((old.key_sha256, old.until) for old in record.previous if old.until > now)
        clashes = []
        for digest, until in (*current, *previous):
            file_key = self._by_hash.get(digest)
            if file_key is not None and file_key.name != record.name:
                clashes.append(Clash(file_key.name, record.name, digest, until))
        self._tell(clashes)

    def _all(self, *, on_loop: bool) -> Iterator[Clash]:
        now = self._clock()
        if on_loop:
            held = self._api_keys.secrets_among(self._by_hash)
        else:
            # Off the event loop (a reload's thread) the file's secrets are walked, not the
            # table's, which the loop may change meanwhile: a lookup is safe, a walk is not.
            secret_of = self._api_keys.secret
            held = ((d, found) for d in self._by_hash if (found := secret_of(d)) is not None)
        for digest, (key, until) in held:
            file_key = self._by_hash[digest]
            # A name in both is the name rule's (the API key is not served at all); a secret
            # whose grace is over is no key's.
            if key.name != file_key.name and (until is None or until > now):
                yield Clash(file_key.name, key.name, digest, until)

    def _tell(self, clashes: Iterable[Clash]) -> None:
        told = 0
        more = 0
        for clash in clashes:
            seen = (clash.file_key, clash.api_key, clash.digest)
            if seen in self._told:
                continue
            self._told.add(seen)
            if told < _MAX_TOLD:
                log.warning("%s", clash.describe())
                told += 1
            else:
                more += 1
        if more:
            log.warning(
                "API keys: and %d more secrets of file keys are also API keys'; each is served "
                "as the file key",
                more,
            )
