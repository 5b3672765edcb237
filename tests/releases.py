"""A previous release's `mirror` package, unpacked from git, for tests that run two releases."""

from __future__ import annotations

import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The release a rolling update starts from: what replicas on the same Redis and bucket run
# while this one replaces them.
PREVIOUS_RELEASE = "50d24e1"


def unpack_release(commit: str, into: Path) -> Path | None:
    """`commit`'s `mirror` package under `into` (a tree for PYTHONPATH and cwd); None when
    the commit is not in this clone (a shallow one, say)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "mirror"],
        cwd=REPO_ROOT, capture_output=True, check=False,
    )  # fmt: skip
    if archive.returncode != 0:
        return None
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into
