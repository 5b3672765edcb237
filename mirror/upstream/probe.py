"""Open circuits probed in the background, so that an upstream back from an outage shows as
up (and its circuit closes) on a mirror no client is pulling through.

Without it the circuit's probe is the next client's request: a quiet mirror (a night, a
test cluster) kept `mirror_upstream_up` at 0 after a short outage until someone pulled,
and `MirrorUpstreamDown` fired for an upstream that had been back for hours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from mirror.upstream.client import Upstream

# How often the open circuits are looked at: each is asked only once its backoff is over
# (1 s, doubling to 60 s while it keeps failing), so this bounds the wait past that alone.
LOOK_EVERY = 1.0


async def probe_open_circuits(upstreams: Iterable[Upstream]) -> None:
    """Until cancelled: each upstream whose circuit is open is probed when due
    (`Upstream.probe` asks nothing of one that is not)."""
    every = list(upstreams)
    while True:
        await asyncio.sleep(LOOK_EVERY)
        await asyncio.gather(*(upstream.probe() for upstream in every))
