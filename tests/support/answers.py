"""A whole HTTP answer as a test's client read it, whichever client that was."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROBLEM_CONTENT_TYPE = "application/problem+json"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # case-insensitive, as HTTP header names are
    body: bytes

    def problem(self) -> dict[str, Any]:
        """The problem+json body of one of the gateway's own answers; {} for any other."""
        if self.headers.get("Content-Type") != PROBLEM_CONTENT_TYPE:
            return {}
        problem: dict[str, Any] = json.loads(self.body)
        return problem

    @property
    def code(self) -> Any:
        """The problem's `code`; None for an answer that is not a problem."""
        return self.problem().get("code")
