"""The compact node tree gives the tags, values and lines PyYAML's own composer gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config.yamltree import MappingNode, Node, ScalarNode, SequenceNode, compose_tree
from tests.support.paths import REPO_ROOT

SAMPLES = sorted(
    [*(REPO_ROOT / "config").glob("*.yaml"), *(REPO_ROOT / "tests" / "config").glob("*.yaml")]
)


def shape_of_pyyaml(node: yaml.Node, seen: dict[int, int]) -> object:
    if isinstance(node, yaml.ScalarNode):
        return ("scalar", node.tag, node.value, node.start_mark.line + 1, node.style)
    if id(node) in seen:
        return ("same as", seen[id(node)])
    seen[id(node)] = len(seen)
    line = node.start_mark.line + 1
    if isinstance(node, yaml.SequenceNode):
        return ("seq", node.tag, line, [shape_of_pyyaml(item, seen) for item in node.value])
    pairs = [(shape_of_pyyaml(k, seen), shape_of_pyyaml(v, seen)) for k, v in node.value]
    return ("map", node.tag, line, pairs)


def shape_of_tree(node: Node, seen: dict[int, int]) -> object:
    if isinstance(node, ScalarNode):
        return ("scalar", node.tag, node.value, node.line, node.style)
    if id(node) in seen:
        return ("same as", seen[id(node)])
    seen[id(node)] = len(seen)
    if isinstance(node, SequenceNode):
        return ("seq", node.tag, node.line, [shape_of_tree(item, seen) for item in node.value])
    assert isinstance(node, MappingNode)
    pairs = [(shape_of_tree(k, seen), shape_of_tree(v, seen)) for k, v in node.value]
    return ("map", node.tag, node.line, pairs)


def both(text: str) -> tuple[object, object]:
    expected = yaml.compose(text, Loader=yaml.SafeLoader)
    got = compose_tree(text)
    if expected is None or got is None:
        return expected, got
    return shape_of_pyyaml(expected, {}), shape_of_tree(got, {})


# Not compared: a syntax error, a nesting PyYAML's own parser cannot read (it recurses), and a
# file that is not text (not UTF-8) for either.
_UNREADABLE = {"bad_yaml_syntax.yaml", "bad_yaml_too_deep.yaml", "bad_not_utf8.yaml"}


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.name not in _UNREADABLE])
def test_the_same_tree_as_pyyaml_for_every_sample_config(sample: Path) -> None:
    text = sample.read_text()
    try:
        expected, got = both(text)
    except yaml.YAMLError:
        with pytest.raises(yaml.YAMLError):
            compose_tree(text)
        return
    assert got == expected


def test_implicit_types_anchors_merges_and_explicit_tags() -> None:
    text = """\
base: &base {rate: 5, on: yes, none: ~, empty: , when: 2026-01-01, ratio: 0.5, hex: 0x1F}
quoted: ["5", '~', "yes"]
derived:
  <<: *base
  rate: 7
tagged: !!str 12
custom: !thing value
list: &items
  - a
  - - nested
other: *items
"""
    expected, got = both(text)
    assert got == expected
    tree = compose_tree(text)
    assert isinstance(tree, MappingNode)
    lines = {key.value: value.line for key, value in tree.value}
    assert lines == {
        "base": 1,
        "quoted": 2,
        "derived": 4,
        "tagged": 6,
        "custom": 7,
        "list": 8,
        "other": 8,  # the node the alias names
    }


def test_empty_documents_have_no_root() -> None:
    assert compose_tree("") is None
    assert compose_tree("# only a comment\n") is None


@pytest.mark.parametrize(
    ("text", "problem", "line"),
    [
        ("a: *nowhere\n", "found undefined alias 'nowhere'", 1),
        ("a: &x 1\nb: &x 2\n", "second occurrence", 2),
        ("a: 1\n---\nb: 2\n", "but found another document", 2),
        ("a: [1, 2\nb: 3\n", None, 2),
    ],
)
def test_errors_carry_the_line_of_the_problem(text: str, problem: str | None, line: int) -> None:
    with pytest.raises(yaml.MarkedYAMLError) as raised:
        compose_tree(text)
    error = raised.value
    assert error.problem_mark is not None
    assert error.problem_mark.line + 1 == line
    if problem is not None:
        assert problem in str(error.problem) or problem in str(error.context)
