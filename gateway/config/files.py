"""The files a config path names and their top-level sections: a file, or a folder's `*.yaml`
files merged by section (README, "Configuration reference")."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from gateway.config.load_warnings import LoadWarning
from gateway.config.yamlnodes import ConfigIssue, Walker, compose, line_of
from gateway.config.yamltree import MappingNode, Node

# The loader's logger, as before these functions left it: a log filter may name it.
log = logging.getLogger("gateway.config.loader")

SECTIONS = ("server", "storage", "auth", "products", "plans", "keys")


@dataclass(frozen=True, slots=True)
class Section:
    """A top-level section: the file it was written in and its nodes."""

    walker: Walker
    key: Node
    value: Node


def config_files(path: Path) -> list[str]:
    """The files a config at `path` is read from, in the order they are merged: the file
    itself, or a folder's `*.yaml` files by name. Dotfiles are editor droppings
    (`.#products.yaml`), not configuration. Reloads watch exactly these."""
    if not path.is_dir():
        return [str(path)]
    return sorted(
        str(child)
        for child in path.iterdir()
        if child.suffix == ".yaml"
        and not child.name.startswith(".")
        # A symlink to nothing, or a folder so named, is kept, to be reported unreadable, not
        # skipped in silence.
        and (child.is_file() or child.is_dir() or (child.is_symlink() and not child.exists()))
    )


def files_of(path: Path, issues: list[ConfigIssue], warnings: list[LoadWarning]) -> list[str]:
    try:
        if path.is_dir():
            files = config_files(path)
            # `.yml` is the other common ending: a file named so is not read, and said so
            # rather than left out in silence (its plans or keys missing with no word why).
            unread = sorted(
                child.name
                for child in path.iterdir()
                if child.suffix == ".yml" and not child.name.startswith(".")
            )
            if not files:
                missing = "no *.yaml files in this folder"
                if unread:
                    missing += f" ({', '.join(unread)} not read: a folder's files end in .yaml)"
                issues.append(ConfigIssue(str(path), None, "", missing))
            elif unread:
                listed = ", ".join(unread)
                unread_said = f"{path}: {listed} not read: only a folder's *.yaml files are"
                warnings.append(LoadWarning(log.name, unread_said))
            return files
        if not path.exists():
            issues.append(ConfigIssue(str(path), None, "", "no such file or folder"))
            return []
    except OSError as exc:  # a name too long, a folder we may not look into: a traceback
        issues.append(ConfigIssue(str(path), None, "", f"cannot be read: {exc.strerror or exc}"))
        return []
    return [str(path)]


def read_sections(files: list[str], issues: list[ConfigIssue]) -> dict[str, Section]:
    sections: dict[str, Section] = {}
    for file in files:
        text = read_text(file)
        if isinstance(text, ConfigIssue):
            issues.append(text)
            continue
        root, problem = compose(text, file)
        if problem is not None:
            issues.append(problem)
            continue
        if root is None:  # empty, or only comments
            continue
        walker = Walker(file, issues)
        if not isinstance(root, MappingNode):
            walker.report(root, "", f"must be a mapping of sections ({', '.join(SECTIONS)})")
            continue
        fields = walker.mapping(root, "", SECTIONS)
        if fields is None:
            continue
        for name, key, value in fields:
            first = sections.get(name)
            if first is not None:
                where = f"{first.walker.file}:{line_of(first.key)}"
                walker.report(key, name, f"already defined in {where}")
                continue
            sections[name] = Section(walker, key, value)
    return sections


def read_text(file: str) -> str | ConfigIssue:
    """A config file's text, or why it cannot be had: one that is not UTF-8 (saved as Latin-1)
    is told by line and column, where the codec's own message gave a byte offset in the file."""
    try:
        data = Path(file).read_bytes()
        return data.decode("utf-8")
    except OSError as exc:
        return ConfigIssue(file, None, "", f"cannot be read: {exc}")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        # What precedes the first bad byte was decoded, so the column counts characters.
        column = len(data[line_start : exc.start].decode("utf-8")) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        bad = f"byte 0x{data[exc.start]:02x} in column {column}"
        return ConfigIssue(file, line, "", f"not UTF-8: {bad} (save the file as UTF-8)")
