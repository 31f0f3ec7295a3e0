"""gateway/http/ is a transport that knows nothing of the gateway above it: none of its modules
imports a `gateway` module outside `gateway.http` (the client is told of an upstream through the
`Origin` protocol, which the config's `Upstream` meets). Every import counts: at the top, inside
functions, under TYPE_CHECKING, relative ones, and `importlib.import_module("...")` with a
literal name."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import gateway
import gateway.http

GATEWAY_PACKAGE = Path(gateway.__file__).parent
HTTP_PACKAGE = Path(gateway.http.__file__).parent


def is_allowed(module: str) -> bool:
    if module != "gateway" and not module.startswith("gateway."):
        return True  # the standard library and third parties are no layer of ours
    return module == "gateway.http" or module.startswith("gateway.http.")


def is_gateway_module(name: str) -> bool:
    """Whether `name` is a module or package of the gateway's source tree."""
    if name != "gateway" and not name.startswith("gateway."):
        return False
    place = GATEWAY_PACKAGE.joinpath(*name.split(".")[1:])
    return place.with_suffix(".py").is_file() or (place / "__init__.py").is_file()


def imported_modules(source: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in `source`, a module of `package`; in `from m import n`
    the module is `m.n` where `n` is a module of its own, else `m`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield node.lineno, full if is_gateway_module(full) else base
        elif isinstance(node, ast.Call) and (name := imported_by_call(node)):
            yield node.lineno, name


def imported_by_call(call: ast.Call) -> str | None:
    """The module of `importlib.import_module("m")` or `__import__("m")`; None otherwise."""
    function = call.func
    called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
    if called not in ("import_module", "__import__") or not call.args:
        return None
    first = call.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def forbidden_imports(source: str, package: str = "gateway.http") -> list[tuple[int, str]]:
    return [
        (line, module)
        for line, module in imported_modules(source, package)
        if not is_allowed(module)
    ]


def http_modules() -> list[Path]:
    return sorted(HTTP_PACKAGE.rglob("*.py"))


def test_gateway_http_imports_nothing_of_the_domain() -> None:
    found = []
    for path in http_modules():
        for line, module in forbidden_imports(path.read_text()):
            found.append(f"gateway/http/{path.relative_to(HTTP_PACKAGE)}:{line} imports {module}")
    assert found == [], "gateway/http/ must not import the domain:\n" + "\n".join(found)


def test_the_walk_sees_the_package_and_its_own_imports() -> None:
    # Not vacuous: every module is read, and imports inside gateway.http are found as such.
    names = {path.name for path in http_modules()}
    assert {"server.py", "client.py", "errors.py", "wire.py", "__init__.py"} <= names
    server = (HTTP_PACKAGE / "server.py").read_text()
    assert "gateway.http.errors" in {
        module for _, module in imported_modules(server, "gateway.http")
    }


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("from gateway import metrics", "gateway.metrics"),
        ("import gateway.problems", "gateway.problems"),
        ("from gateway.config import Config", "gateway.config"),
        ("from gateway.config.model import Upstream", "gateway.config.model"),
        ("from gateway.limits.base import Decision", "gateway.limits.base"),
        ("from .. import pipeline", "gateway.pipeline"),
        ("from ..record import RequestRecord", "gateway.record"),
        ("def f():\n    from gateway.proxy import forward\n", "gateway.proxy"),
        ("if TYPE_CHECKING:\n    from gateway.runtime import Runtime\n", "gateway.runtime"),
        ("import importlib\nimportlib.import_module('gateway.admin')", "gateway.admin"),
    ],
)
def test_a_domain_import_is_caught_wherever_it_stands(source: str, module: str) -> None:
    assert module in {found for _, found in forbidden_imports(source)}


@pytest.mark.parametrize(
    "source",
    [
        "from gateway.http.errors import HttpError",
        "from . import wire",
        "from .flow import ChunkQueue",
        "import asyncio\nimport httptools",
    ],
)
def test_the_transport_and_other_libraries_are_allowed(source: str) -> None:
    assert forbidden_imports(source) == []
