"""How long one small exchange with an upstream (or its token service) may take in all.

aiohttp's read timeout bounds each wait for the next bytes, not the exchange: an answer
that trickles a byte every few seconds holds a pull, and every client waiting on it, for
hours. A manifest, a HEAD, a tag-list or referrers page, a token and a blob's response
head are small: each must end within this. A blob's body is not held to it (a big layer
takes its time); its reads are. A paged document (a tag list, referrers) is held in all,
pages together, to PAGED_EXCHANGES exchanges: 260 s with the default timeouts, time for a
couple of hundred honest pages, not for each to take the whole of its own deadline.
"""

from __future__ import annotations

import aiohttp

# Exchanges' worth of time the pages of one paged document may take together.
PAGED_EXCHANGES = 4


def exchange_deadline(connect_timeout: float, read_timeout: float) -> float:
    """The connection, then two full read waits: a slow but honest answer gets through, a
    trickle does not."""
    return connect_timeout + 2 * read_timeout


def session_deadline(session: aiohttp.ClientSession) -> float:
    """The deadline for a session's own timeouts (the token service's)."""
    timeout = session.timeout
    return exchange_deadline(timeout.sock_connect or 5.0, timeout.sock_read or 30.0)
