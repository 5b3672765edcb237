"""The top-level README's configuration block shows the real defaults.

Every key it shows is at its default unless the line's comment begins with `example` (which
covers the key's whole section): setting that one key to the value shown, alone, must give
the config `load_config` gives without a file. So a changed default, or a README value that
is not one, fails here instead of misleading readers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.config import config_from_mapping, load_config

README = Path(__file__).resolve().parent.parent / "README.md"
_KEY_LINE = re.compile(r"^( *)([^\s:#][^:#]*?):(?:\s|$)(.*)$")
_COMMENT = re.compile(r"(?:^|\s)#\s*(.*)$")

Key = tuple[str, ...]


def config_block() -> str:
    """The YAML block of the README's Configuration section."""
    section = README.read_text().split("\n## Configuration\n", 1)[1]
    match = re.search(r"^```yaml\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert match, "no ```yaml block in the README's Configuration section"
    return match.group(1)


def example_keys(block: str) -> set[Key]:
    """Keys whose line's comment begins with `example`."""
    marked: set[Key] = set()
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        match = _KEY_LINE.match(line)
        if match is None:
            continue  # blank, or a comment line
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        comment = _COMMENT.search(rest)
        if comment and comment.group(1).startswith("example"):
            marked.add(tuple(k for _, k in stack))
    return marked


def leaves(raw: dict[str, Any], prefix: Key = ()) -> Iterator[tuple[Key, Any]]:
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def nested(key: Key, value: Any) -> dict[str, Any]:
    for part in reversed(key):
        value = {part: value}
    return dict(value)


def test_example_keys() -> None:
    block = (
        "a: 1          # the default\n"
        "b:            # example; null by default\n"
        "  c: 2\n"
        "d:\n"
        "  # e: 1      # example\n"
        "  e: 3        # example: not the default\n"
        "  f: x        # an example would not count here\n"
    )
    assert example_keys(block) == {("b",), ("d", "e")}


BLOCK = config_block()
SHOWN = [
    (key, value)
    for key, value in leaves(yaml.safe_load(BLOCK))
    if not any(key[: len(marked)] == marked for marked in example_keys(BLOCK))
]


def test_the_block_shows_defaults_and_marks_examples() -> None:
    assert load_config(None) == config_from_mapping({})
    assert len(SHOWN) >= 20, "the README's config block shows hardly any defaults"
    # Sections left out of the block that a reader would look for are marked, not absent.
    assert {("tls",), ("cluster",), ("upstreams",)} <= example_keys(BLOCK)


@pytest.mark.parametrize("key, value", SHOWN, ids=[".".join(key) for key, _ in SHOWN])
def test_the_readme_shows_the_default(key: Key, value: Any) -> None:
    assert config_from_mapping(nested(key, value)) == load_config(None), (
        f"README.md shows {'.'.join(key)}: {value!r}, which is not the default; "
        "fix it, or begin its comment with `example`"
    )
