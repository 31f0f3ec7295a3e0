"""A compact YAML node tree, built from libyaml's events, that remembers one line per node.

Why not `yaml.compose`: its nodes carry two `Mark` objects each and a `__dict__`, which for a
file of 100,000 keys came to about 450 MB and (with the pure-Python parser) most of a minute.
Here libyaml (PyYAML's C parser, when PyYAML was built with it) scans and parses, and each node
keeps its tag, value and line in slots: the same tags and values as PyYAML's own composer, with
the line numbers that `file:line: path: message` errors need, at a fraction of the memory.
"""

from __future__ import annotations

from typing import Any

import yaml
import yaml.nodes
from yaml.composer import ComposerError
from yaml.error import Mark
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.resolver import Resolver

# libyaml when PyYAML has it; the pure-Python parser reads the same YAML, only slower.
_PARSER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_RESOLVER = Resolver()
STR_TAG = "tag:yaml.org,2002:str"
SEQUENCE_TAG = "tag:yaml.org,2002:seq"
MAPPING_TAG = "tag:yaml.org,2002:map"
# First characters for which PyYAML's resolver may find an implicit type (int, bool, null...).
_RESOLVED_FIRST_CHARACTERS = frozenset(
    key for key in Resolver.yaml_implicit_resolvers if key is not None
) | {""}
# Plain values up to this long are shared (one string for each `name`, `plans`, `trial`...)
# and their resolved tags remembered; longer ones are mostly unique (hashes, URLs).
_CACHED_VALUE_LENGTH = 24


class Node:
    """A node of the tree: its resolved tag, its value and its 1-based line."""

    __slots__ = ("line", "tag", "value")

    tag: str
    value: Any
    line: int


class ScalarNode(Node):
    __slots__ = ("style",)

    value: str

    def __init__(self, tag: str, value: str, line: int, style: str | None) -> None:
        self.tag = tag
        self.value = value
        self.line = line
        self.style = style

    def as_pyyaml(self) -> yaml.nodes.ScalarNode:
        """The same scalar as a PyYAML node, for PyYAML's constructors."""
        return yaml.nodes.ScalarNode(self.tag, self.value, None, None, self.style)


class SequenceNode(Node):
    __slots__ = ()

    value: list[Node]

    def __init__(self, tag: str, line: int) -> None:
        self.tag = tag
        self.value = []
        self.line = line


class MappingNode(Node):
    __slots__ = ()

    value: list[tuple[Node, Node]]

    def __init__(self, tag: str, line: int) -> None:
        self.tag = tag
        self.value = []
        self.line = line


def tree_of_pyyaml(node: yaml.Node) -> Node:
    """The same tree from PyYAML nodes (those `represent_data` makes of plain data, which have
    no marks: their line is 0, "not from a file")."""
    line = 0 if node.start_mark is None else node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode):
        return ScalarNode(node.tag, node.value, line, node.style or None)
    if isinstance(node, yaml.SequenceNode):
        sequence = SequenceNode(node.tag, line)
        sequence.value = [tree_of_pyyaml(item) for item in node.value]
        return sequence
    mapping = MappingNode(node.tag, line)
    mapping.value = [(tree_of_pyyaml(key), tree_of_pyyaml(value)) for key, value in node.value]
    return mapping


def _mark(name: str, line: int) -> Mark:
    return Mark(name, 0, line - 1, 0, None, 0)


def compose_tree(text: str, name: str = "<config>") -> Node | None:
    """The root node of the one document in `text`, or None for an empty one.

    Raises `yaml.MarkedYAMLError` (or `yaml.YAMLError`) as `yaml.compose` does.
    """
    parser = _PARSER(text)
    try:
        return _Composer(parser, name).single_document()
    finally:
        parser.dispose()


class _Composer:
    def __init__(self, parser: Any, name: str) -> None:
        self._next = parser.get_event
        self._name = name
        self._anchors: dict[str, Node] = {}
        self._tags: dict[str, str] = {}  # short plain value -> its tag
        self._words: dict[str, str] = {}  # short plain value -> the one string kept for it

    def single_document(self) -> Node | None:
        next_event = self._next
        event = next_event()
        if type(event) is StreamStartEvent:
            event = next_event()
        root: Node | None = None
        if type(event) is DocumentStartEvent:
            root = self._document()
            event = next_event()
            if type(event) is not StreamEndEvent:
                raise ComposerError(
                    "expected a single document in the stream",
                    _mark(self._name, root.line),
                    "but found another document",
                    event.start_mark,
                )
        return root

    def _plain_tag(self, value: str) -> str:
        """The tag PyYAML's resolver gives a plain scalar (most cost a dict lookup here)."""
        if value[:1] not in _RESOLVED_FIRST_CHARACTERS:
            return STR_TAG  # no implicit type starts with this character
        tag = self._tags.get(value)
        if tag is None:
            tag = _RESOLVER.resolve(yaml.nodes.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
            if len(value) <= _CACHED_VALUE_LENGTH:
                self._tags[value] = tag
        return tag

    def _document(self) -> Node:
        """The nodes of one document, up to and including its end event.

        Every open collection collects its children in a flat list (a mapping's keys and
        values alternate), paired up when it ends: cheaper than pairing on each event.
        """
        next_event = self._next
        anchors = self._anchors
        plain_tag = self._plain_tag
        words = self._words
        open_nodes: list[Node] = []
        children: list[list[Node]] = []
        siblings: list[Node] | None = None  # children of the innermost open collection
        root: Node | None = None
        while True:
            event = next_event()
            kind = type(event)
            node: Node
            if kind is ScalarEvent:
                value = event.value
                tag = event.tag
                if tag is None or tag == "!":
                    if event.implicit[0]:
                        tag = plain_tag(value)
                        if len(value) <= _CACHED_VALUE_LENGTH:
                            value = words.setdefault(value, value)
                    else:
                        tag = STR_TAG
                node = ScalarNode(tag, value, event.start_mark.line + 1, event.style or None)
                if event.anchor is not None:
                    self._remember(event, node)
                if siblings is None:
                    root = node
                else:
                    siblings.append(node)
                continue
            if kind is MappingStartEvent or kind is SequenceStartEvent:
                tag = event.tag
                line = event.start_mark.line + 1
                if kind is MappingStartEvent:
                    node = MappingNode(MAPPING_TAG if tag is None or tag == "!" else tag, line)
                else:
                    node = SequenceNode(SEQUENCE_TAG if tag is None or tag == "!" else tag, line)
                if event.anchor is not None:
                    self._remember(event, node)
                open_nodes.append(node)
                siblings = []
                children.append(siblings)
                continue
            if kind is MappingEndEvent or kind is SequenceEndEvent:
                node = open_nodes.pop()
                items = children.pop()
                if kind is MappingEndEvent:
                    pairs = iter(items)
                    node.value = list(zip(pairs, pairs, strict=False))
                else:
                    node.value = items
                siblings = children[-1] if children else None
                if siblings is None:
                    root = node
                else:
                    siblings.append(node)
                continue
            if kind is AliasEvent:
                found = anchors.get(event.anchor)
                if found is None:
                    raise ComposerError(
                        None, None, f"found undefined alias {event.anchor!r}", event.start_mark
                    )
                if siblings is None:
                    root = found
                else:
                    siblings.append(found)
                continue
            if kind is DocumentEndEvent:
                self._anchors = {}
                assert root is not None
                return root
            raise ComposerError(  # pragma: no cover - libyaml emits nothing else in a document
                None, None, f"unexpected {event!r}", event.start_mark
            )

    def _remember(self, event: Any, node: Node) -> None:
        anchor = event.anchor
        first = self._anchors.get(anchor)
        if first is not None:
            raise ComposerError(
                f"found duplicate anchor {anchor!r}; first occurrence",
                _mark(self._name, first.line),
                "second occurrence",
                event.start_mark,
            )
        self._anchors[anchor] = node
