"""What `workers: auto` counts: the CPUs this process may keep busy. Those it may run on,
fewer when the CFS quota of its cgroup, or of any cgroup above it, allows less (what a
container runtime sets from Kubernetes' `resources.limits.cpu` or docker's `--cpus`). A
node's core count is not the answer in a container: 64 workers under a 2-CPU limit are
throttled together, and hold 64 workers' memory against the container's limit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# cgroup v2's and v1's files for the quota, and what "no quota" reads as in each.
V2_MAX = "cpu.max"
V1_QUOTA, V1_PERIOD = "cpu.cfs_quota_us", "cpu.cfs_period_us"


def usable_cpus(proc: Path = Path("/proc/self")) -> int:
    """The CPUs the process may run on, fewer when a cgroup quota allows less (whole CPUs,
    rounded down: 2.5 CPUs keep 2 workers busy without throttling; 1 at least)."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(proc)
    if quota is None:
        return cpus
    return max(1, min(cpus, int(quota)))


def cgroup_cpu_quota(proc: Path = Path("/proc/self")) -> float | None:
    """The smallest CFS quota, in CPUs, over the process's cgroup and its ancestors (as far
    as this mount namespace sees them); None without one, or unreadable."""
    try:
        memberships = (proc / "cgroup").read_text()
        mounts = (proc / "mountinfo").read_text()
    except OSError:
        return None
    quotas = [q for d in _cpu_cgroups(memberships, mounts) for q in _quotas_up(*d)]
    return min(quotas) if quotas else None


def _cpu_cgroups(memberships: str, mounts: str) -> Iterator[tuple[Path, Path, bool]]:
    """(the process's cgroup directory, its mount point, v2?) for each hierarchy with the
    cpu controller: cgroup v2's unified one, or v1's `cpu`."""
    paths: dict[str, str] = {}  # "" for v2, else each v1 controller
    for line in memberships.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            paths[controller] = parts[2]
    for line in mounts.splitlines():
        found = _cgroup_mount(line)
        if found is None:
            continue
        root, point, v2, options = found
        path = paths.get("" if v2 else "cpu")
        if path is None or (not v2 and "cpu" not in options):
            continue
        relative = os.path.relpath(path, root)
        if relative == ".." or relative.startswith("../"):
            continue  # the process's cgroup is outside what this mount shows
        yield Path(point, relative), Path(point), v2


def _cgroup_mount(line: str) -> tuple[str, str, bool, set[str]] | None:
    """(root, mount point, v2?, super options) of a mountinfo line for a cgroup mount."""
    fields = line.split()
    if "-" not in fields:
        return None
    dash = fields.index("-")
    if len(fields) < dash + 4 or dash < 5:
        return None
    fstype, options = fields[dash + 1], set(fields[dash + 3].split(","))
    if fstype not in ("cgroup", "cgroup2"):
        return None
    return _unescape(fields[3]), _unescape(fields[4]), fstype == "cgroup2", options


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, plain)
    return field


def _quotas_up(directory: Path, top: Path, v2: bool) -> Iterator[float]:
    """Each quota from `directory` up to the mount point, in CPUs."""
    current = directory
    while True:
        quota = _v2_quota(current) if v2 else _v1_quota(current)
        if quota is not None:
            yield quota
        if current == top or current.parent == current:
            return
        current = current.parent


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, _, period = (directory / V2_MAX).read_text().strip().partition(" ")
    except OSError:
        return None
    return _ratio(quota, period)


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = (directory / V1_QUOTA).read_text().strip()
        period = (directory / V1_PERIOD).read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    """quota / period, or None for "max" or -1 (no quota) and anything unreadable."""
    if not (quota.isascii() and quota.isdigit() and period.isascii() and period.isdigit()):
        return None
    if int(period) == 0 or int(quota) == 0:
        return None
    return int(quota) / int(period)
