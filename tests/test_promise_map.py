"""docs/testing.md maps each documented promise to the test that keeps it: every test it
names exists, and every test written for a promise (tests/test_promise_*.py) is named there.
A test renamed or dropped fails here until the map says so too."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAP = (REPO / "docs" / "testing.md").read_text(encoding="utf-8")


@functools.cache
def defined_tests(path: Path) -> frozenset[str]:
    """The test functions defined at the top level of a test module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    )


def test_every_test_the_map_names_exists() -> None:
    named = set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", MAP))
    assert len(named) > 100
    missing = sorted(
        f"{file}::{name}"
        for file, name in named
        if not (REPO / file).is_file() or name not in defined_tests(REPO / file)
    )
    assert missing == [], missing


def test_every_promise_test_is_in_the_map() -> None:
    unnamed = sorted(
        f"tests/{path.name}::{name}"
        for path in (REPO / "tests").glob("test_promise_*.py")
        for name in defined_tests(path)
        if f"`tests/{path.name}::{name}`" not in MAP and path.name != "test_promise_map.py"
    )
    assert unnamed == [], unnamed
