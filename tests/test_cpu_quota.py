"""`workers: auto` under a CPU quota (mirror/config/cpus.py): real cgroups with a CFS quota
on this machine's cpu hierarchy (v1 `cpu`, or v2), a Python process moved into one, and
what `auto` comes to there. Before: the core count, whatever the container's limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.config.cpus import cgroup_cpu_quota, usable_cpus
from tests.services import REPO_ROOT

V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")
AUTO = """
import sys
from mirror.config.load import load_config
print(load_config(sys.argv[1]).workers)
"""


class CpuCgroups:
    """Fresh cgroups under the cpu hierarchy's root, removed after the test."""

    def __init__(self, root: Path, v2: bool) -> None:
        self.root, self.v2 = root, v2
        self.made: list[Path] = []

    def make(self, name: str, parent: Path | None = None) -> Path:
        path = (parent or self.root) / name
        path.mkdir()
        self.made.append(path)
        if self.v2 and parent is not None:  # a v2 child has the controller only if asked
            (parent / "cgroup.subtree_control").write_text("+cpu")
        return path

    def limit(self, path: Path, cpus: float) -> None:
        period = 100_000
        if self.v2:
            (path / "cpu.max").write_text(f"{int(cpus * period)} {period}")
        else:
            (path / "cpu.cfs_period_us").write_text(str(period))
            (path / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))

    def auto_inside(self, path: Path, config: Path) -> int:
        """`workers: auto` as a process in `path` reads it."""

        def enter() -> None:  # in the child, before exec: its own pid into the cgroup
            (path / "cgroup.procs").write_text(str(os.getpid()))

        out = subprocess.run(
            [sys.executable, "-c", AUTO, str(config)],
            cwd=REPO_ROOT,
            preexec_fn=enter,  # noqa: PLW1509 (the child is a fresh interpreter, no threads)
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(out.stdout)

    def remove(self) -> None:
        for path in reversed(self.made):  # children first; their one process has exited
            path.rmdir()


@pytest.fixture
def cgroups() -> Iterator[CpuCgroups]:
    if (V1 / "cpu.cfs_quota_us").exists():
        found = CpuCgroups(V1, v2=False)
    elif "cpu" in _read(V2 / "cgroup.subtree_control").split():
        found = CpuCgroups(V2, v2=True)
    else:
        pytest.skip("no cpu cgroup controller to make a cgroup under")
    if not os.access(found.root, os.W_OK):
        pytest.skip(f"{found.root} is not writable (root needed)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: a quota could not lower `auto`")
    try:
        yield found
    finally:
        found.remove()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mirror.yml"
    path.write_text("workers: auto\n")
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_auto_is_one_worker_per_cpu_the_quota_allows(cgroups: CpuCgroups, config: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    unlimited = cgroups.make(f"mirror-test-{uuid.uuid4().hex[:8]}")
    assert cgroups.auto_inside(unlimited, config) == cpus
    cgroups.limit(unlimited, 1)
    assert cgroups.auto_inside(unlimited, config) == 1  # before: every core of the host


def test_a_quota_on_a_cgroup_above_counts_too(cgroups: CpuCgroups, config: Path) -> None:
    """Kubernetes sets the pod's limit on the pod's cgroup, the process runs in a child."""
    pod = cgroups.make(f"mirror-test-{uuid.uuid4().hex[:8]}")
    container = cgroups.make("container", parent=pod)
    cgroups.limit(pod, 1.5)  # rounded down: two workers would be throttled together
    assert cgroups.auto_inside(container, config) == 1


def fake_proc(tmp_path: Path, membership: str, root: str = "/") -> tuple[Path, Path]:
    """A /proc/self of a process in cgroup v2 `membership`, its hierarchy mounted (from
    `root`) at a directory whose name has a space, as mountinfo escapes it."""
    proc, mount = tmp_path / "proc", tmp_path / "cgroup fs"
    proc.mkdir()
    (proc / "cgroup").write_text(f"0::{membership}\n")
    escaped = str(mount).replace(" ", "\\040")
    (proc / "mountinfo").write_text(
        "22 1 8:1 / / rw,relatime - ext4 /dev/vda rw\n"
        f"30 22 0:26 {root} {escaped} rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    return proc, mount


def test_cgroup_v2_quotas_are_read_up_the_tree(tmp_path: Path) -> None:
    proc, mount = fake_proc(tmp_path, "/kubepods/pod1/ctr")
    (mount / "kubepods/pod1/ctr").mkdir(parents=True)
    (mount / "kubepods/pod1/cpu.max").write_text("250000 100000\n")
    (mount / "kubepods/pod1/ctr/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(proc) == 2.5
    (mount / "kubepods/pod1/ctr/cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_quota(proc) == 0.5
    assert usable_cpus(proc) == 1  # at least one


def test_a_container_sees_its_own_cgroup_as_the_root(tmp_path: Path) -> None:
    """With a cgroup namespace the process's cgroup is "/" and the mount shows only it."""
    proc, mount = fake_proc(tmp_path, "/")
    mount.mkdir()
    (mount / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(proc) == 1.5


def test_no_quota_or_no_cgroup_leaves_the_cpus(tmp_path: Path) -> None:
    proc, mount = fake_proc(tmp_path, "/elsewhere", root="/mine")  # not under the mount
    mount.mkdir()
    (mount / "cpu.max").write_text("100000 100000\n")
    assert cgroup_cpu_quota(proc) is None
    assert cgroup_cpu_quota(tmp_path / "no-proc") is None
    assert usable_cpus(tmp_path / "no-proc") == len(os.sched_getaffinity(0))
