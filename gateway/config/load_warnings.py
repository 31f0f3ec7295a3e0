"""The warnings of one load of the config: things the load accepts but an operator must hear of
(a `*.yml` file left unread, a certificate out of its dates).

A load gathers them rather than logging them as it goes, because a config is loaded in one
process and used in others: a child reads it for the supervisor, the supervisor hands it to
its workers, each of which builds the TLS context again. Logged where they were found, each
warning came out once per process that touched the load (1 + N times with N workers, at every
start and reload), and an operator could not tell one problem from several. Gathered, they
travel with the config (`gateway.config.isolated`) and are told once, by the process that
reads the files for the gateway: the single process, or the supervisor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["LoadWarning", "tell_warnings"]


@dataclass(frozen=True, slots=True)
class LoadWarning:
    """One warning: `message` as the module named `logger` says it."""

    logger: str
    message: str

    def tell(self) -> None:
        logging.getLogger(self.logger).warning("%s", self.message)


def tell_warnings(warnings: Iterable[LoadWarning]) -> None:
    for warning in warnings:
        warning.tell()
