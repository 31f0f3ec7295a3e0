"""The fields of an admin keys call's body and query, read: each mistake a 400 whose detail
starts with the field it is about (`plans.soccer: ...`), each value as the record keeps it."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from typing import Any

from gateway.config.access import (
    EMPTY_KEY_REFUSAL,
    EMPTY_KEY_SHA256,
    SHA256_HEX,
    validate_key_plans,
)
from gateway.config.durations import parse_duration
from gateway.config.instants import parse_instant
from gateway.config.model import Config
from gateway.config.yamlnodes import ConfigError
from gateway.keys.index import KeyIndex
from gateway.keys.records import KEY_NAME, KEY_NAME_HINT
from gateway.problems import BadRequest, Conflict

DEFAULT_PAGE, MAX_PAGE = 100, 1000
# 32 random bytes: as hard to guess as the SHA-256 that stands for them.
_SECRET_BYTES = 32


def read_name(value: object) -> str:
    if not isinstance(value, str) or not KEY_NAME.fullmatch(value):
        raise BadRequest(f"name: {KEY_NAME_HINT}")
    return value


# The mistakes in a body's `plans` one answer names, the first ones; the rest are counted.
_MAX_ISSUES_TOLD = 20


def read_plans(
    value: object, config: Config, kept: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The `plans` of a key as the body gave them, once the config file's own rules accept
    them; kept as given, so that the record holds any form the file accepts.

    `kept`: the key's plans as stored; an entry the body gives as it is there is not checked
    again. A reload may have taken its product or plan out of the config, and an operator who
    sends back the plans read with one of them changed is fixing something else (the key
    keeps serving what it served); an entry that is new or changed must name what the config
    has."""
    checked = value
    if kept and isinstance(value, dict):
        checked = {p: v for p, v in value.items() if p not in kept or not _same(kept[p], v)}
    try:
        validate_key_plans(checked, config.products, config.plans)
    except ConfigError as error:
        issues = [f"{issue.path}: {issue.message}" for issue in error.issues]
        if len(issues) > _MAX_ISSUES_TOLD:
            # 40,000 unknown products in a body under 1 MiB made a 2.6 MB answer.
            more = len(issues) - _MAX_ISSUES_TOLD
            issues[_MAX_ISSUES_TOLD:] = [f"and {more} more"]
        raise BadRequest("; ".join(issues)) from None
    assert isinstance(value, dict)  # validated: a mapping
    return value


def _same(stored: object, given: object) -> bool:
    """Whether `given` is `stored` as JSON tells them apart: to `==`, `5.0` is 5 and `true` is
    1, and an entry sent back so was taken as unchanged and stored unchecked, with a limit the
    key could not be served by (it was served the plan's)."""
    return json.dumps(stored, sort_keys=True) == json.dumps(given, sort_keys=True)


def read_boolean(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{field}: must be true or false")
    return value


def read_expires(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):  # a JSON number is no RFC 3339 time
        raise BadRequest("expires: must be an RFC 3339 time with an offset, or null")
    try:
        return parse_instant(value)
    except ValueError as exc:
        raise BadRequest(f"expires: {exc}") from None


# A rotation's old secret may keep working for at most this long.
_MAX_GRACE = 366 * 24 * 3600.0

# The old secrets still in a grace a key may have: a rotation with a grace past them is refused
# (409). Two, as Azure API Management's primary and secondary keys or AWS Secrets Manager's
# AWSPREVIOUS keep one: one rotation's overlap, and room to rotate again within it (a new
# secret that leaked, or was mistyped into a deploy). Without a cap an hourly rotation job with
# a 30-day grace kept ~720 live secrets for a key, in its record and each announcement of it.
MAX_SECRETS_IN_GRACE = 2


def read_grace(value: object) -> float:
    try:
        grace = parse_duration(value)
    except ValueError as exc:
        raise BadRequest(f"grace: {exc}") from None
    if grace > _MAX_GRACE:
        raise BadRequest(f"grace: must be at most {_MAX_GRACE / 3600:.0f}h (366 days)")
    return grace


def new_secret(data: dict[str, Any]) -> tuple[str | None, str]:
    """(the new secret to show once, its digest); no secret when the body brings a digest."""
    if "key_sha256" in data:
        digest = data["key_sha256"]
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise BadRequest("key_sha256: must be 64 hexadecimal characters (a SHA-256)")
        if digest.lower() == EMPTY_KEY_SHA256:
            raise BadRequest(f"key_sha256: {EMPTY_KEY_REFUSAL}")
        return None, digest.lower()
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return secret, hashlib.sha256(secret.encode()).hexdigest()


def refuse_file_secret(index: KeyIndex, digest: str) -> None:
    if index.file_digest_owner(digest) is not None:
        raise Conflict("key_sha256: a key of the config file has this secret")


def read_page_size(value: str | None) -> int:
    if value is None:
        return DEFAULT_PAGE
    # isascii: str.isdigit() is also true of '²' and other digits int() does not take.
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_PAGE:
        raise BadRequest(f"limit: must be an integer from 1 to {MAX_PAGE}")
    return int(value)
