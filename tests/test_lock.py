"""The lock (requirements/*.txt) agrees with pyproject.toml: every declared dependency is
pinned there, within its declared range, with hashes, and the three locks pin alike."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.services import REPO_ROOT

LOCKS = REPO_ROOT / "requirements"
# Which lock holds which of pyproject's groups ("" is the runtime dependencies).
GROUPS = {"runtime.txt": ("",), "test.txt": ("", "test"), "bench.txt": ("", "test", "bench")}


def pins(lock: Path) -> dict[str, tuple[str, int]]:
    """name → (pinned version, number of hashes) for every entry of a lock."""
    found = {}
    for entry in re.split(r"\n(?=\S)", lock.read_text()):
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", entry)
        if match:
            name = canonicalize_name(match[1])
            found[name] = (match[2], entry.count("--hash=sha256:"))
    return found


def declared(groups: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = []
    for group in groups:
        lines += project["dependencies"] if group == "" else project["optional-dependencies"][group]
    build = (LOCKS / "build.in").read_text().splitlines()
    lines += [line for line in build if line.strip() and not line.startswith("#")]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("lock_name", sorted(GROUPS))
def test_every_declared_dependency_is_pinned_within_its_range(lock_name: str) -> None:
    locked = pins(LOCKS / lock_name)
    for requirement in declared(GROUPS[lock_name]):
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in {lock_name}: run `make lock`"
        version, _ = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock_name} pins {name}=={version}, outside pyproject's {requirement}: `make lock`"
        )


@pytest.mark.parametrize("lock_name", sorted(GROUPS))
def test_every_pin_has_a_hash(lock_name: str) -> None:
    for name, (version, hashes) in pins(LOCKS / lock_name).items():
        assert hashes, f"{name}=={version} in {lock_name} has no hash"


def test_the_locks_pin_alike() -> None:
    runtime, test, bench = (pins(LOCKS / name) for name in ("runtime.txt", "test.txt", "bench.txt"))
    for name, (version, _) in runtime.items():
        assert test[name][0] == version, f"{name}: runtime {version}, test {test[name][0]}"
    for name, (version, _) in test.items():
        assert bench[name][0] == version, f"{name}: test {version}, bench {bench[name][0]}"
