"""ETags of keys, and the `If-Match` condition that makes an admin change of a key conditional.

Two admin callers that change one key at about the same time each get their change made (the
store writes a key atomically, each change on the newest record), so the later one silently
undoes what the earlier one just promised its customer: a rotation with no grace kills the
secret the other rotation handed out. With `If-Match` a caller says "only if the key is still
as I read it", and gets 412 instead of a change made on a state it never saw.

An API key's ETag is a digest of its record as stored, not its `updated` time: that time comes
from each gateway process's own clock (two processes may stamp one instant, and a clock may step
back), and one kind of write leaves it as it is (a rotated-out secret whose grace is over
dropped when another key takes that secret). The record is the very thing the store's atomic
write compares, so the ETag changes exactly when the key does. A file key's ETag is a digest of
its entry in the config file: it changes when a reload changes the entry; the API never changes
a file key (409 whatever `If-Match` says).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from gateway.config.model import ApiKey
from gateway.keys.records import KeyRecord
from gateway.problems import BadRequest, PreconditionFailed

HEADER = "If-Match"
# Hex digits of the record's SHA-256 kept: 128 bits, so that two states never share one.
_DIGEST_CHARS = 32
# An entity-tag (RFC 9110 8.8.3): an optional weak prefix and a quoted string of etagc.
_ENTITY_TAG = re.compile(r'(W/)?"[\x21\x23-\x7e\x80-\U0010ffff]*"')
_EMPTY_ELEMENTS = re.compile(r"[ \t,]*")  # RFC 9110 5.6.1: empty list elements are ignored
_AFTER_TAG = re.compile(r"[ \t]*(?:,[ \t,]*)?")


@dataclass(frozen=True, slots=True)
class IfMatch:
    """A request's `If-Match`: the strong ETags it names, or any state at all (`*`)."""

    tags: frozenset[str]
    any_state: bool = False

    def require(self, name: str, current: str) -> None:
        """PreconditionFailed unless `current`, the key's ETag now, is one the caller named.
        Weak ETags never match (If-Match compares strongly; these ETags are strong)."""
        if self.any_state or current in self.tags:
            return
        raise PreconditionFailed(
            f"{HEADER}: the key '{name}' is no longer as you read it; its ETag is now"
            f" {current}. Nothing was changed: read the key again before you change it."
        )


def check_if_match(condition: IfMatch | None, record: KeyRecord) -> None:
    """PreconditionFailed when the request had an `If-Match` that `record`, the key as stored
    (and, for a change, about to be replaced) does not match. A change calls it inside the
    store's atomic write, on the record that write replaces: checked on a read before it, two
    callers holding one ETag would both pass."""
    if condition is not None:
        condition.require(record.name, api_key_etag(record))


def if_match(request: web.Request) -> IfMatch | None:
    """The request's `If-Match`, None without one; a value that is neither `*` nor a list of
    entity-tags is 400 (a tag without its quotes, say): taken as a tag that never matches it
    would be a 412 the caller could not explain, and ignored, a change made unconditionally."""
    lines = request.headers.getall(HEADER, [])
    if not lines:
        return None
    if len(lines) == 1 and lines[0].strip(" \t") == "*":
        return IfMatch(frozenset(), any_state=True)
    tags: set[str] = set()
    named = False
    for line in lines:
        position = _skip(_EMPTY_ELEMENTS, line, 0)
        while position < len(line):
            tag = _ENTITY_TAG.match(line, position)
            if tag is None:
                raise _malformed()
            named = True
            if tag.group(1) is None:
                tags.add(tag.group(0))
            position = _skip(_AFTER_TAG, line, tag.end())
            if position < len(line) and "," not in line[tag.end() : position]:
                raise _malformed()  # two tags without a comma between them
    if not named:
        raise _malformed()
    return IfMatch(frozenset(tags))


def _skip(pattern: re.Pattern[str], line: str, position: int) -> int:
    """Where `line` goes on after what `pattern` (one that matches the empty string) takes."""
    taken = pattern.match(line, position)
    assert taken is not None
    return taken.end()


def _malformed() -> BadRequest:
    return BadRequest(
        f"{HEADER}: must be * or one or more ETags as the key's answers give them, in double"
        ' quotes and separated by commas, e.g. If-Match: "3f2a..."'
    )


def api_key_etag(record: KeyRecord) -> str:
    return _etag("api", record.to_json())


def file_key_etag(key: ApiKey) -> str:
    return _etag("file", json.dumps(key, default=_plain, sort_keys=True, separators=(",", ":")))


def _etag(source: str, text: str) -> str:
    # The source is hashed too: a file key and an API key of one name (the file's shadows the
    # other, which shows once a reload drops the file's) never share an ETag.
    digest = hashlib.sha256(f"{source}\n{text}".encode()).hexdigest()
    return f'"{digest[:_DIGEST_CHARS]}"'


def _plain(value: object) -> object:
    """A file key's parts as JSON, the same in every process (no set order, no repr)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(str(item) for item in value)
    return str(value)  # a time zone, a quota period
