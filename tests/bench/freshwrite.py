"""The blob's size written into a new file on the cache's disk: the part of a cold fill
that no mirror can skip, measured beside the cold rows' references.

A cold GET through the mirror lands every byte of the blob in new page-cache pages; the
references it is held to (nginx's file, already in memory; a direct fetch, read into
/dev/null) write none. On a bare host that write is a memory copy, a tenth of a second
for 512 MiB. On a VM whose kernel reports free memory to the host (`page_reporting`, as
on this bench's Firecracker machine), memory freed a few seconds earlier has gone back to
the host, and the first write to each such page is a fault the host serves: `dd` of 512
MiB into a new file took 0.57-0.92 CPU-seconds a few seconds after other files were
deleted, 0.15 just after. `dd` after the same quiet start as each timed part shows what
that costs in the run at hand.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.bench.cpu import CpuMeter, Used
from tests.bench.settle import settle

MIB = 1024 * 1024
DD = "dd"
PAGE_REPORTING = Path("/sys/module/page_reporting")


def fresh_write(directory: Path, size: int) -> tuple[float, Used]:
    """Seconds and CPU seconds of `dd` writing `size` bytes into a new file in `directory`
    (written back before the next part; the file removed)."""
    path = directory / "fresh-write.bin"
    settle()
    with CpuMeter({}, DD) as cpu:
        start = time.monotonic()
        subprocess.run(
            [DD, "if=/dev/zero", f"of={path}", "bs=1M", f"count={-(-size // MIB)}", "status=none"],
            check=True,
        )
        seconds = time.monotonic() - start
    path.unlink()
    return seconds, cpu.used


def side(size_mib: int, seconds: float) -> str:
    """The name a row's CPU column gives the write."""
    return f"{size_mib} MiB into a new file {seconds:.2f} s"


def page_reporting() -> str:
    """How this machine's kernel gives free memory back to its host, for the run's notes."""
    order = PAGE_REPORTING / "parameters" / "page_reporting_order"
    if not order.exists():
        return "free page reporting: off"
    blocks = 4 << int(order.read_text().strip() or 0)  # KiB per reported block
    return f"free page reporting: on (blocks of {blocks // 1024} MiB go back to the host)"
