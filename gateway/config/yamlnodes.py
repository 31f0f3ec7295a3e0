"""Reading composed YAML nodes so that every value keeps its line, and every mistake is
collected as a `ConfigIssue` instead of stopping at the first one.

The loader works on a node tree (`gateway.config.yamltree`) rather than on `yaml.safe_load`
data because plain Python values have forgotten where they were written, and an error message
without a line sends people hunting through files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import yaml
from yaml.constructor import SafeConstructor

from gateway.config.durations import DURATION_HINT, parse_duration
from gateway.config.model import MAX_COUNT
from gateway.config.yamltree import (
    MAPPING_TAG,
    SEQUENCE_TAG,
    MappingNode,
    Node,
    ScalarNode,
    SequenceNode,
    compose_tree,
)

T = TypeVar("T")

_MERGE_TAG = "tag:yaml.org,2002:merge"
_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
# The scalar types a config is written in, each read by PyYAML's safe constructor; any other
# tag (`!!python/object:...`, `!!binary`, `!custom`) is refused by name: nothing of it is built.
_SCALAR_TAGS = frozenset(
    f"tag:yaml.org,2002:{kind}" for kind in ("null", "bool", "int", "float", "timestamp")
)
_KNOWN_TAGS = _SCALAR_TAGS | {_STR_TAG, MAPPING_TAG, SEQUENCE_TAG, _MERGE_TAG}
_YAML_TAG_PREFIX = "tag:yaml.org,2002:"
# Tags YAML gives an unquoted word it reads as a number or a boolean (`2025`, `no`, `1.0`).
_TYPED_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{kind}" for kind in ("int", "float", "bool"))
# YAML 1.1, which PyYAML reads, takes `010` for 8 (octal) and `1:30` for 90 (base 60): an
# integer written like that is refused rather than read as a number nobody meant.
_SURPRISING_INTEGER = re.compile(r"[-+]?0[0-9_]+|.*:.*")
# A file this small is parsed again by PyYAML's pure-Python parser when libyaml rejects it:
# its messages say what it found ("expected ',' or '}', but got '{'"), libyaml's do not.
_REPARSE_FOR_MESSAGE_BELOW = 256 * 1024


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One mistake: `file:line: path: message` (line absent for the environment or a folder)."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid; `issues` holds every mistake found, in file order."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


def line_of(node: Node) -> int:
    """The node's line in its file; 0 for a node built from data (an admin API body)."""
    return node.line


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def compose(text: str, file: str) -> tuple[Node | None, ConfigIssue | None]:
    """Parse one file into its node tree, or describe why it is not YAML."""
    try:
        return compose_tree(text, file), None
    except yaml.MarkedYAMLError as exc:
        error = exc
        if len(text) < _REPARSE_FOR_MESSAGE_BELOW:
            try:
                yaml.compose(text, Loader=yaml.SafeLoader)
            except yaml.MarkedYAMLError as pure_python_error:
                error = pure_python_error
            except (yaml.YAMLError, RecursionError):
                # RecursionError: PyYAML's own parser recurses per level, where libyaml stops
                # at 1,000 levels with a message of its own, which is kept.
                pass
        return None, _syntax_issue(error, file)
    except yaml.reader.ReaderError as exc:
        # A character YAML refuses (a control character): PyYAML's own text has no line and
        # runs over two lines ('in "<unicode string>", position 99'); said as file:line.
        # Its position is not an index into `text` with libyaml, which counts the bytes of
        # the text as UTF-8; the character itself is, as the reader refuses the first one.
        at = text.find(chr(exc.character))
        line = text.count("\n", 0, exc.position if at < 0 else at) + 1
        message = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
        return None, ConfigIssue(file, line, "", message)
    except yaml.YAMLError as exc:
        return None, ConfigIssue(file, None, "", str(exc))
    except RecursionError:  # PyYAML without libyaml, whose parser recurses per level
        return None, ConfigIssue(file, None, "", "nested too deeply to be read")


def _syntax_issue(exc: yaml.MarkedYAMLError, file: str) -> ConfigIssue:
    mark = exc.problem_mark or exc.context_mark
    message = exc.problem or exc.context or "invalid YAML"
    if exc.problem and exc.context:
        message = f"{exc.problem} ({exc.context})"
    if exc.context and "flow" in exc.context and "got '{'" in message:
        # `{to: /a/{rest}}` is the usual culprit: braces inside an unquoted flow value.
        message += "; quote values that contain { } [ ] or ,"
    return ConfigIssue(file, None if mark is None else mark.line + 1, "", message)


def _tag_refusal(tag: str) -> str:
    """`the tag !!python/object:x is not supported`, in the short form it is written in."""
    written = f"!!{tag.removeprefix(_YAML_TAG_PREFIX)}" if tag.startswith(_YAML_TAG_PREFIX) else tag
    return f"the tag {written} is not supported"


def _merge_sources(merges: list[Node]) -> Iterator[Node]:
    """What `<<` entries name: a mapping each, or a list of them."""
    for merge in merges:
        if isinstance(merge, SequenceNode):
            yield from merge.value
        else:
            yield merge


@dataclass(frozen=True, slots=True)
class Fields:
    """A mapping's entries by key name, each with its key node and value node."""

    node: MappingNode
    path: str
    entries: dict[str, tuple[Node, Node]]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[tuple[str, Node, Node]]:
        for name, (key, value) in self.entries.items():
            yield name, key, value

    def value(self, name: str) -> Node | None:
        entry = self.entries.get(name)
        return None if entry is None else entry[1]

    def at(self, name: str) -> str:
        return join(self.path, name)


Reader = Callable[[Node, str], T | None]


class Walker:
    """Typed reads of one file's nodes; a failed read records an issue and returns None."""

    def __init__(self, file: str, issues: list[ConfigIssue]) -> None:
        self.file = file
        self.issues = issues
        self._constructor = SafeConstructor()

    def report(self, where: Node | int | None, path: str, message: str) -> None:
        if isinstance(where, Node) and where.tag not in _KNOWN_TAGS:
            # The tag is why the value could not be read ("must be an integer" of `!foo 3`).
            message = f"{_tag_refusal(where.tag)}: write the value without it"
        line = where if where is None or isinstance(where, int) else line_of(where)
        self.issues.append(ConfigIssue(self.file, line, path, message))

    # -- containers -------------------------------------------------------------------------

    def mapping(self, node: Node, path: str, allowed: Sequence[str] | None = None) -> Fields | None:
        """The entries of a mapping; duplicate and unknown keys are reported and left out."""
        if not isinstance(node, MappingNode) or node.tag != MAPPING_TAG:
            self.report(node, path, "must be a mapping")
            return None
        entries: dict[str, tuple[Node, Node]] = {}
        merges: list[Node] = []
        # The keys written in the mapping itself first (a file of 100,000 keys has a million
        # of them: this loop is kept plain), then those `<<` merges in, which fill gaps only.
        for key, value in node.value:
            if key.tag == _MERGE_TAG:
                merges.append(value)
                continue
            name = self._key_name(key, path, allowed)
            if name is None:
                continue
            first = entries.get(name)
            if first is not None:
                message = f"duplicate key (first at line {first[0].line})"
                self.report(key, join(path, name), message)
                continue
            entries[name] = (key, value)
        if merges:
            for key, value in self._merged(merges, node, path):
                name = self._key_name(key, path, allowed)
                if name is not None:
                    entries.setdefault(name, (key, value))
        return Fields(node, path, entries)

    def _key_name(self, key: Node, path: str, allowed: Sequence[str] | None) -> str | None:
        if not isinstance(key, ScalarNode):
            self.report(key, path, "keys must be plain names")
            return None
        name = str(key.value)
        if allowed is not None and name not in allowed:
            self.report(key, join(path, name), f"unknown key (allowed: {', '.join(allowed)})")
            return None
        return name

    def _merged(
        self, merges: list[Node], node: MappingNode, path: str
    ) -> Iterator[tuple[Node, Node]]:
        """The pairs the `<<` entries of `node` bring in, each source's own pairs and then
        those it merges in itself, depth first.

        Since the first occurrence of a merged key wins, this order gives YAML's precedence:
        own keys over merged ones, a source's own keys over what it merged itself, and
        earlier sources of `<<: [*a, *b]` over later ones. So a source met a second time
        brings nothing new and is skipped: a mapping merging itself (`&a {<<: *a}`) went
        round until a RecursionError, and nine levels of `<<: [*x, *x, ...]` made billions
        of pairs out of a few lines. A stack, not recursion: a chain of merges has no depth
        limit.
        """
        seen = {id(node)}
        pending: list[Iterator[Node]] = [_merge_sources(merges)]
        while pending:
            source = next(pending[-1], None)
            if source is None:
                pending.pop()
                continue
            if id(source) in seen:
                continue
            seen.add(id(source))
            if not isinstance(source, MappingNode):
                self.report(source, path, "`<<` must name a mapping")
                continue
            inner: list[Node] = []
            for key, value in source.value:
                if key.tag == _MERGE_TAG:
                    inner.append(value)
                else:
                    yield key, value
            if inner:
                pending.append(_merge_sources(inner))

    def sequence(self, node: Node, path: str) -> list[Node] | None:
        if not isinstance(node, SequenceNode) or node.tag != SEQUENCE_TAG:
            self.report(node, path, "must be a list")
            return None
        return list(node.value)

    # -- scalars ----------------------------------------------------------------------------

    def scalar(self, node: Node) -> object:
        """The Python value of a scalar node; a non-scalar comes back as the node itself."""
        if not isinstance(node, ScalarNode):
            return node
        if node.tag == _STR_TAG:
            return node.value
        if node.tag not in _SCALAR_TAGS:
            return node  # an unknown `!tag`: no usable value, the typed reads say so
        construct = SafeConstructor.yaml_constructors[node.tag]
        try:
            # Called directly rather than through construct_object, which would remember
            # every node it was given for the constructor's lifetime.
            return construct(self._constructor, node.as_pyyaml())
        # `!!int abc`, `!!timestamp 2020-13-45`; `!!bool maybe` (KeyError) and `!!timestamp
        # soon` (AttributeError) went up as a traceback out of `gateway check`.
        except (yaml.YAMLError, ValueError, KeyError, AttributeError):
            return node

    def is_null(self, node: Node) -> bool:
        return isinstance(node, ScalarNode) and node.tag == _NULL_TAG

    def string(self, node: Node, path: str) -> str | None:
        value = self.scalar(node)
        if not isinstance(value, str):
            self.report(node, path, "must be a string")
            return None
        if not value.strip():
            self.report(node, path, "must not be empty")
            return None
        return value

    def name(self, node: Node, path: str) -> str | None:
        """A name (of a key, or of the plan a key uses) as it is written.

        A mapping key is always read as written, so `plans:` may declare `2025:` or `no:`; a
        value naming that plan (`shop: 2025`, `shop: no`) is read as written too, where YAML
        alone made it a number or a boolean and "must be a string" of a plan that exists.
        """
        if isinstance(node, ScalarNode) and node.style is None and node.tag in _TYPED_PLAIN_TAGS:
            return node.value
        return self.string(node, path)

    def integer(
        self, node: Node, path: str, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int):
            self.report(node, path, "must be an integer")
            return None
        if self._surprising_number(node, path, value):
            return None
        if minimum is not None and value < minimum:
            self.report(node, path, f"must be at least {minimum}")
            return None
        if maximum is not None and value > maximum:
            self.report(node, path, f"must be at most {maximum}")
            return None
        return value

    def _surprising_number(self, node: Node, path: str, value: object) -> bool:
        """Whether `value`, a number read from `node`, was written as YAML 1.1 octal or base 60
        (reported, then)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not isinstance(node, ScalarNode) or not _SURPRISING_INTEGER.fullmatch(node.value):
            return False
        self.report(
            node,
            path,
            f"{node.value} would be read as {value} (YAML 1.1 octal or base 60): write the"
            " number in decimal, without leading zeros",
        )
        return True

    def positive(self, node: Node, path: str) -> int | None:
        """A count of requests or units: 1 to MAX_COUNT."""
        return self.integer(node, path, minimum=1, maximum=MAX_COUNT)

    def boolean(self, node: Node, path: str) -> bool | None:
        value = self.scalar(node)
        if not isinstance(value, bool):
            self.report(node, path, "must be true or false")
            return None
        return value

    def duration(self, node: Node, path: str) -> float | None:
        """A duration longer than zero."""
        value = self.scalar(node)
        try:
            seconds = parse_duration(value)
        except ValueError:
            self.report(node, path, DURATION_HINT)
            return None
        # A plain number of seconds is an integer too: `drain_timeout: 030` was 24 seconds.
        if self._surprising_number(node, path, value):
            return None
        if seconds <= 0:
            self.report(node, path, "must be longer than 0")
            return None
        return seconds

    def choice(self, node: Node, path: str, choices: Sequence[str]) -> str | None:
        value = self.scalar(node)
        if not isinstance(value, str) or value not in choices:
            self.report(node, path, f"must be one of {', '.join(choices)}")
            return None
        return value

    def regex(self, node: Node, path: str) -> re.Pattern[str] | None:
        text = self.string(node, path)
        if text is None:
            return None
        try:
            return re.compile(text)
        except re.error as exc:
            self.report(node, path, f"invalid regular expression: {exc.msg} at position {exc.pos}")
            return None
        # Not re.error, but the same mistake (`[0-9]{99999999999}`; groups nested a thousand
        # deep): they went up as a traceback out of `gateway check` and the start.
        except OverflowError as exc:
            self.report(node, path, f"invalid regular expression: {exc}")
            return None
        except RecursionError:
            self.report(node, path, "invalid regular expression: nested too deeply")
            return None

    def words(self, node: Node, path: str) -> list[str] | None:
        """A non-empty list of values compared as text (an enum of `[1, 2]` means "1", "2")."""
        items = self.sequence(node, path)
        if items is None:
            return None
        if not items:
            self.report(node, path, "must not be empty")
            return None
        words: list[str] = []
        for index, item in enumerate(items):
            # The text as written, so that `[no, yes]` stays two words rather than booleans.
            if not isinstance(item, ScalarNode) or self.is_null(item) or item.value == "":
                self.report(item, f"{path}[{index}]", "must be a string")
                return None
            words.append(str(item.value))
        return words

    def distinct_words(self, node: Node, path: str) -> list[str] | None:
        """`words` that are a set (an `enum`): one written twice is reported (`distinct`)."""
        words = self.words(node, path)
        if words is not None:
            self.distinct(node, path, words, "value")
        return words

    def distinct(self, node: Node, path: str, values: Sequence[str], what: str) -> bool:
        """Whether the list `node`, its items read as `values` (one each, in order), names each
        value once; else the second of two is reported, with where the first one is. A set
        that says one thing twice is a slip (`[5xx, 5xx]` for `[5xx, 499]`), and the loader
        says so as it does of a key given twice in a mapping."""
        if not isinstance(node, SequenceNode):
            return True  # not a list: reported as such by the read of its values
        first_at: dict[str, int] = {}
        for index, value in enumerate(values):
            first = first_at.setdefault(value, index)
            if first != index:
                item = node.value[index]
                written = item.value if isinstance(item, ScalarNode) else value
                where = f"first in {path}[{first}], line {line_of(node.value[first])}"
                self.report(item, f"{path}[{index}]", f"duplicate {what} {written!r} ({where})")
                return False
        return True

    # -- fields of a mapping ----------------------------------------------------------------

    def optional(self, fields: Fields, name: str, read: Reader[T], default: T) -> T:
        node = fields.value(name)
        if node is None:
            return default
        value = read(node, fields.at(name))
        return default if value is None else value

    def required(self, fields: Fields, name: str, read: Reader[T]) -> T | None:
        node = fields.value(name)
        if node is None:
            self.report(fields.node, fields.at(name), "is required")
            return None
        return read(node, fields.at(name))
