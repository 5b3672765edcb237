"""glibc's allocator, told to hand large buffers back to the system when they are freed.

By default glibc raises its mmap threshold each time a large block is freed, so that later
blocks of that size (8 MiB and larger, made in worker threads with arenas of their own)
come from heaps that never shrink: a few concurrent transfers then leave tens of MiB
resident for good. A fixed threshold keeps such blocks in mmap: freed, gone. The cost is
a fresh page fault for each page of each such block, so what is needed again and again
is kept instead (the S3 upload's part buffers: storage/s3/upload.py, `PartBuffers`).

A fixed mmap threshold also fixes the trim threshold at its default, 128 KiB: the heap
would then be cut back each time a few socket buffers at its top are freed, and grown
again by the next ones, every page faulted in anew (a fifth of the CPU a relay of
bucket bytes used). The trim threshold is set above what a blob relay holds at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from malloc.h
M_MMAP_THRESHOLD = -3
# Above the 1 MiB buffers that carry blob bytes (those are reused from the heap), below
# the 8 MiB upload parts.
MMAP_THRESHOLD = 4 * 1024 * 1024
# Free memory at the heap's top kept for reuse: a few relays' buffers.
TRIM_THRESHOLD = 8 * 1024 * 1024


def return_large_blocks() -> None:
    """Fix glibc's mmap and trim thresholds (no effect, and no error, on another libc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
            log.debug("mallopt refused the mmap threshold")
        if libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
            log.debug("mallopt refused the trim threshold")
    except (OSError, AttributeError):
        pass
