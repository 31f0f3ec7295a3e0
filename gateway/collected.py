"""Keeping long-lived objects out of the cyclic collector's full collections.

A full collection walks every object the collector tracks, on the event loop. What a worker
reads and keeps for long holds no reference cycles (reference counting frees it), yet each
full collection walked all of it: with 100,000 API keys a full read set off collections of up
to 202 ms during it and 52-158 ms after it, until the next reload; the principals made for the
first requests after a reload, 13-110 ms each; 100,000 keys created through the admin API
(each worker applying them change by change), 250-557 ms each from about 50,000 keys on.
Frozen as they are made, those collections hold the loop 1-10 ms during a read and 1-2.4 ms
after it.
"""

from __future__ import annotations

import gc


def freeze_collected() -> None:
    """Leave what is alive now out of later full collections (`gc.freeze`), after a full
    collection, which is short while the rest is frozen already: cyclic garbage would be kept
    for good once frozen, sockets and all (it hung a test run's loop at its close once). For
    what a worker makes between reloads and keeps (a full read of the API keys, the keys it
    follows change by change, the principals a key index makes): objects without cycles, freed
    by reference counting, frozen or not."""
    gc.collect()
    gc.freeze()
