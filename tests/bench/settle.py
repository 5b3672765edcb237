"""Each timed part starts on a quiet machine: the disk written out and the CPUs idle.

The parts of a phase run back to back, and some leave work behind them: a cold GET leaves
its 512 MiB in writeback, and the S3 backend's mirror is still uploading the blob (and RGW
and its OSD still writing it) when its clients have their last byte: /proc/stat showed
the two CPUs 34-57 % busy for a second after an S3 cold part. On two cores the next part,
the filesystem mirror's or a reference's, shared them with that tail. So before each
timed part, of the mirror and of the reference alike, `settle()` syncs and waits until
the CPUs are idle. (It does not remove the spread between cold runs, which comes from
the memory the blob lands in: see freshwrite.py.)
"""

from __future__ import annotations

import os
import time

# Busy below this share of both CPUs over one look counts as quiet: the bench's own
# servers idle at a few per cent.
QUIET = 0.10
LOOK = 0.5  # seconds per look at /proc/stat
PATIENCE = 60.0  # seconds: then the part runs anyway


def settle() -> None:
    """Write out what earlier parts left dirty, then wait for idle CPUs."""
    os.sync()
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline and busy_share(LOOK) >= QUIET:
        pass


def busy_share(seconds: float) -> float:
    """The share of all CPUs' time spent busy (not idle, not waiting on I/O) over `seconds`."""
    total0, idle0 = _cpu_times()
    time.sleep(seconds)
    total1, idle1 = _cpu_times()
    spent = total1 - total0
    return 1.0 - (idle1 - idle0) / spent if spent else 0.0


def _cpu_times() -> tuple[int, int]:
    """(all, idle + iowait) jiffies summed over the CPUs, from /proc/stat's first line."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]
