"""What the reloader watches: the files the loader reads, and nothing else."""

from __future__ import annotations

import gc
import os
import resource
import weakref
from pathlib import Path

from gateway.reload import Reloader, config_fingerprint
from tests.support.config import write_config


def test_the_fingerprint_ignores_dotfiles_as_the_loader_does(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("products: {}\n")
    dotfile = tmp_path / ".b.yaml"  # what an editor leaves next to the file it has open
    dotfile.write_text("plans: {}\n")

    before = config_fingerprint(str(tmp_path))
    assert [Path(entry[0]).name for entry in before] == ["a.yaml"]

    dotfile.write_text("plans: {edited: {}}\n")
    assert config_fingerprint(str(tmp_path)) == before

    (tmp_path / "a.yaml").write_text("products: {edited: {}}\n")
    assert config_fingerprint(str(tmp_path)) != before


def test_a_symlink_turned_to_a_file_of_the_same_size_and_mtime_is_a_change(tmp_path: Path) -> None:
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("quota: 2001\n")
    two.write_text("quota: 2002\n")
    for release in (one, two):
        os.utime(release, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    current = tmp_path / "current.yaml"
    current.symlink_to(one)
    before = config_fingerprint(str(current))
    current.unlink()
    current.symlink_to(two)  # what a deploy that switches releases does
    assert config_fingerprint(str(current)) != before


def test_a_folder_that_cannot_be_listed_is_a_change_not_an_error(tmp_path: Path) -> None:
    """Out of descriptors (or the folder renamed away for a moment), listing it fails: the
    watch must go on, and see the edit once the folder can be listed again."""
    (tmp_path / "a.yaml").write_text("products: {}\n")
    before = config_fingerprint(str(tmp_path))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no descriptor left
    try:
        unlisted = config_fingerprint(str(tmp_path))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert unlisted != before
    assert config_fingerprint(str(tmp_path)) == before


class _Cycle:
    """Garbage that only the cyclic collector frees: it refers to itself."""

    def __init__(self) -> None:
        self.me = self


async def test_garbage_made_between_reloads_is_not_frozen_by_the_next(tmp_path: Path) -> None:
    """A reload freezes what is alive (`freeze_long_lived`); cyclic garbage that had reached the
    oldest generation by then (an aiohttp route answering an unknown admin path refers to
    itself) was frozen with it, for good: a soak kept ~180 of them per worker in 13 minutes."""
    config = write_config(tmp_path / "conf", _API, server="")
    reloader = Reloader(str(config), apply=lambda _: None)
    thresholds = gc.get_threshold()
    gc.collect()
    # No collection of its own in the meantime: the garbage waits as in the oldest generation.
    gc.set_threshold(1_000_000_000)
    try:
        cycle = _Cycle()
        made = weakref.ref(cycle)
        del cycle
        assert await reloader.reload_off_loop()
        assert made() is None, "the reload froze the garbage made before it"
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()  # this test's reload froze the test process; nothing else does


_API = """
products:
  shop:
    upstream: {url: "http://127.0.0.1:9"}
    routes:
      - path: /shop/{rest:path}
plans:
  open: {}
keys:
  - {name: client, key: reload-secret, plans: {shop: open}}
"""
