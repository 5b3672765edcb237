"""Marks in Redis on the bucket objects replicas stream right now, for the eviction to skip.

One key per digest, `mirror:reading:<digest>`: a set of the replicas streaming the object
(`<advertise URL> <nonce>`), with an expiry. A replica adds itself when its first stream of
the object starts, renews the expiry every third of the lease TTL while any runs, and takes
itself out when the last ends, leaving the key `grace` seconds more (a placeholder member):
a client that resumes with a Range finds the object still there. A replica that dies stops
renewing: its mark runs out within one TTL of the last renewal. Each script touches its one
key only, so a Cluster routes it by the key's slot; the set never lives without an expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter

from mirror.cluster.lease import Leases
from mirror.metadata.topology import DOWN_ERRORS

log = logging.getLogger(__name__)

READING_PREFIX = "mirror:reading:"
# The member standing for "read within the grace period" once no replica streams it.
LATELY = "-"
# Add the reader; the key lives at least ARGV[2] ms more (never less than it had).
_MARK = """
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""
# Take the reader out; with a grace, the key stays (LATELY) at least ARGV[2] ms more.
_RELEASE = """
redis.call('SREM', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then
  redis.call('SADD', KEYS[1], ARGV[3])
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
end
return 1
"""


class ReadMarks:
    """This replica's marks on the objects it streams from the bucket, and the others'."""

    def __init__(self, leases: Leases) -> None:
        self._leases = leases
        self._member = f"{leases.owner} {secrets.token_hex(8)}"
        self._streams: Counter[str] = Counter()  # digest → streams of it running here
        self._renewer: asyncio.Task[None] | None = None

    def key(self, digest: str) -> str:
        return READING_PREFIX + digest

    async def begin(self, digest: str) -> None:
        self._streams[digest] += 1
        if self._streams[digest] == 1:
            await self._mark(digest)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_while_reading())

    async def end(self, digest: str, grace: float) -> None:
        self._streams[digest] -= 1
        if self._streams[digest] > 0:
            return
        del self._streams[digest]
        await self._script(_RELEASE, digest, int(grace * 1000), LATELY)
        if digest in self._streams:  # a new stream began meanwhile: its mark may be gone
            await self._mark(digest)

    async def marked(self, digest: str) -> bool:
        """Is the object read (or was it, within a grace), here or elsewhere? True when
        Redis does not answer: nothing is evicted that may be read."""
        try:
            async with self._leases.turns:
                return bool(await self._leases.client.exists(self.key(digest)))
        except DOWN_ERRORS:
            return True

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)

    async def _mark(self, digest: str) -> None:
        await self._script(_MARK, digest, int(self._leases.ttl * 1000))

    async def _script(self, script: str, digest: str, *args: str | int) -> None:
        # Redis down: no replica evicts then (no lease), and the renewal marks again.
        with contextlib.suppress(*DOWN_ERRORS):
            async with self._leases.turns:
                await self._leases.client.eval(script, 1, self.key(digest), self._member, *args)

    async def _renew_while_reading(self) -> None:
        """Renew the marks of the running streams every third of the TTL, until none runs."""
        while self._streams:
            await asyncio.sleep(self._leases.ttl / 3)
            for digest in list(self._streams):
                await self._mark(digest)
