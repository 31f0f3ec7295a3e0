"""What the reloader watches: the files the loader reads, and nothing else."""

from __future__ import annotations

from pathlib import Path

from gateway.reload import config_fingerprint


def test_the_fingerprint_ignores_dotfiles_as_the_loader_does(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("products: {}\n")
    dotfile = tmp_path / ".b.yaml"  # what an editor leaves next to the file it has open
    dotfile.write_text("plans: {}\n")

    before = config_fingerprint(str(tmp_path))
    assert [Path(file).name for file, _mtime, _size in before] == ["a.yaml"]

    dotfile.write_text("plans: {edited: {}}\n")
    assert config_fingerprint(str(tmp_path)) == before

    (tmp_path / "a.yaml").write_text("products: {edited: {}}\n")
    assert config_fingerprint(str(tmp_path)) != before
