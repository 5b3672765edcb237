"""Records in Redis are read across releases: the previous release reads what this one
writes, and this one reads what the previous one wrote (a rolling update runs both)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mirror.cluster.lease import _parts
from mirror.metadata.store import SCHEMA_VERSION, TagRecord
from tests.releases import PREVIOUS_RELEASE, unpack_release

RECORD = TagRecord("sha256:" + "a" * 64, "application/vnd.oci.image.index.v1+json", 1234, 1.5e9)
# What the previous release does with a record and a lease value: its own code, run alone.
OLD_READER = """
import json, sys
from mirror.metadata import TagRecord
from mirror.cluster.lease import _owner_of
record = TagRecord.from_json(sys.argv[1])
print(json.dumps({"record": record.to_json(), "owner": _owner_of(sys.argv[2])}))
"""


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's `mirror` package, unpacked from git."""
    tree = unpack_release(PREVIOUS_RELEASE, tmp_path_factory.mktemp("previous"))
    if tree is None:
        pytest.skip(f"{PREVIOUS_RELEASE} is not in this clone")
    return tree


def old_read(tree: Path, record: str, lease_value: str) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", OLD_READER, record, lease_value],
        cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    answer: dict[str, str] = json.loads(done.stdout)
    return answer


def test_the_previous_release_reads_what_this_one_writes(previous_release: Path) -> None:
    answer = old_read(previous_release, RECORD.to_json(), "http://r1:8083 0123abcd")
    assert TagRecord.from_json(answer["record"]) == RECORD
    assert answer["owner"] == "http://r1:8083"


def test_this_release_reads_what_the_previous_one_wrote(previous_release: Path) -> None:
    written = old_read(previous_release, RECORD.to_json(), "x y")["record"]
    assert TagRecord.from_json(written) == RECORD
    assert _parts("http://r0:8083 0123abcd") == ("http://r0:8083", "0123abcd")


def test_a_later_release_s_fields_are_ignored_and_an_unusable_record_is_absent() -> None:
    later = {**json.loads(RECORD.to_json()), "v": SCHEMA_VERSION + 1, "platforms": ["amd64"]}
    assert TagRecord.from_json(json.dumps(later)) == RECORD
    assert TagRecord.from_json(json.dumps({"v": 2, "digest": RECORD.digest})) is None
    assert TagRecord.from_json(json.dumps({**later, "size": "big"})) is None
    assert TagRecord.from_json("[1, 2]") is None
    assert TagRecord.from_json("not json") is None
