"""Resident memory of a process and everything below it, its CPU time, descriptors and
libraries, read from /proc (Linux)."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def _parent_of(pid: str) -> int | None:
    try:
        stat = (PROC / pid / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return int(stat.rpartition(")")[2].split()[1])


def descendants(root: int) -> set[int]:
    """root and every process below it, as /proc shows them right now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (parent := _parent_of(entry.name)) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree


def rss_bytes(pid: int) -> int:
    """VmRSS of one process in bytes; 0 once it is gone (or for a kernel thread)."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> int:
    """The resident memory of root and all its descendants together."""
    return sum(rss_bytes(pid) for pid in descendants(root))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time one process has used so far (0 when it is gone)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    """How many file descriptors one process holds open right now."""
    return len(list((PROC / str(pid) / "fd").iterdir()))


def runs_uvloop(pid: int) -> bool:
    """Whether a process has loaded uvloop's event loop (its extension module is mapped)."""
    return "/uvloop/loop." in (PROC / str(pid) / "maps").read_text()
