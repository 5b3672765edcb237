"""Serving blobs: sendfile from the cache, or streamed from the download under way.

Docker resumes a broken layer with `Range`, and containerd may fetch one blob with several
open-ended ranges at once, so both paths honour a single range.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import BinaryIO

from aiohttp import web

from mirror.cache.blobsizes import BlobSizes
from mirror.cache.downloads import (
    CacheWriteFailed,
    Download,
    Downloads,
    StoredElsewhere,
    Uncacheable,
)
from mirror.cache.holdings import BLOB, Holdings
from mirror.observe.metrics import Metrics
from mirror.oci.errors import RangeNotSatisfiable, RegistryError
from mirror.oci.reference import Digest
from mirror.storage import CacheStore
from mirror.storage.base import (
    BlobSize,
    BlobStream,
    Found,
    Redirect,
    SpooledBlob,
    StoreReadError,
)
from mirror.upstream.body import BODY_ERRORS, BlobBody
from mirror.upstream.client import Upstream
from mirror.util.threadfiles import close_off_loop, open_off_loop
from mirror.web.accesslog import outcome_key, sent_key
from mirror.web.conditional import (
    IMMUTABLE,
    UNVERIFIED,
    digest_headers,
    none_match,
    not_modified,
    range_allowed,
)
from mirror.web.sendfile import send_file
from mirror.web.stamp import prepare

log = logging.getLogger(__name__)

OCTET_STREAM = "application/octet-stream"
# Bytes asked of an upstream body per write when one is relayed.
READ_CHUNK = 1024 * 1024


# `bytes=-0`: the last none of the blob's bytes, which is unsatisfiable (RFC 9110 §14.1.1).
_EMPTY_SUFFIX = slice(None, 0)


def _requested_range(request: web.Request) -> slice | None:
    """The client's single `Range` as aiohttp reads it (a negative start: the last bytes),
    _EMPTY_SUFFIX for `bytes=-0`, None for none or a malformed or multi-range header."""
    if "Range" not in request.headers:
        return None
    try:
        rng = request.http_range
    except ValueError:
        return None
    # aiohttp reads the suffix length 0 as start -0, that is 0: the whole blob.
    if rng.start == 0 and request.headers["Range"][len("bytes=") :].startswith("-"):
        return _EMPTY_SUFFIX
    return rng


def parse_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """Inclusive (start, end) of a single `Range`, None for the whole blob.

    A malformed or multi-range header is ignored (the whole blob is sent), as RFC 9110
    allows; a range that lies past the end, or asks for no bytes, raises
    RangeNotSatisfiable.
    """
    rng = _requested_range(request)
    if rng is None:
        return None
    if rng is _EMPTY_SUFFIX:
        raise RangeNotSatisfiable(size)
    start, stop = rng.start, rng.stop
    if start is not None and start < 0:  # suffix range: the last -start bytes
        start = max(0, size + start)
    start = start or 0
    end = size - 1 if stop is None else min(stop, size) - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(size)
    return start, end


def _single_range(request: web.Request) -> str | None:
    """The client's Range as one well-formed `bytes=` range to pass on, or None (the whole
    blob: a malformed or multi-range header is ignored, as for blobs on disk)."""
    rng = _requested_range(request)
    if rng is None:
        return None
    if rng is _EMPTY_SUFFIX:
        return "bytes=-0"
    if rng.start is not None and rng.start < 0:
        return f"bytes={rng.start}"  # the last -start bytes
    if rng.start is None and rng.stop is None:
        return None
    first = rng.start or 0
    return f"bytes={first}-" if rng.stop is None else f"bytes={first}-{rng.stop - 1}"


class BlobService:
    """Answers blob GETs and HEADs for one upstream and the shared store."""

    def __init__(
        self,
        storage: CacheStore,
        downloads: Downloads,
        metrics: Metrics,
        holdings: Holdings,
        sizes: BlobSizes,
    ) -> None:
        self._storage = storage
        self._downloads = downloads
        self._metrics = metrics
        # A blob goes out under a repository known to hold it, or after the upstream
        # confirmed it under that repository; else the upstream's own answer is fetched.
        self._holdings = holdings
        self._sizes = sizes  # upstream HEADs of uncached blobs, once across replicas
        # Digests being sent from the cache right now: eviction leaves them alone.
        self.reading: Counter[Digest] = Counter()

    async def serve(
        self, request: web.Request, upstream: Upstream, repo: str, digest: Digest
    ) -> web.StreamResponse:
        held = await self._holdings.known(upstream.name, repo, str(digest))
        size = await self._storage.blob_size(digest)
        if size is not None:
            held = held or await self._confirm(upstream, repo, digest, counted=False)
            cached = await self._serve_cached(request, digest, size)
            if cached is not None:
                return cached
        # A download whose bytes are all here and verified, waiting only for its fsync and
        # rename, serves this request from disk: a hit, its bytes counted as from the cache.
        download = self._downloads.get(digest)
        if download is None:  # not being fetched: the store may hold it elsewhere
            found = await self._find_elsewhere(request, digest)
            if found is not None:
                held = held or await self._confirm(upstream, repo, digest, found, counted=False)
                return await self._from_store(request, digest, found)
        return await self._serve_uncached(request, upstream, repo, digest, held)

    async def _confirm(
        self,
        upstream: Upstream,
        repo: str,
        digest: Digest,
        found: Found | None = None,
        fetching: bool = False,
        *,
        counted: bool = True,
    ) -> bool:
        """True once the upstream says the repository holds the blob, else its not-found
        (what was `found` in the store is let go first); see Holdings.confirm. A refusal
        of a request not yet `counted` is its cache miss, as for a digest never pulled:
        the two look alike on /metrics, so it tells no client what others pulled."""
        try:
            await self._holdings.confirm(upstream, repo, str(digest), BLOB, fetching=fetching)
        except BaseException:
            if not counted:
                self._metrics.cache_requests.labels("blob", "miss").inc()
            if found is not None and not isinstance(found, Redirect | BlobSize):
                await found.close()  # a body opened in the bucket
            raise
        return True

    async def _serve_uncached(
        self, request: web.Request, upstream: Upstream, repo: str, digest: Digest, held: bool
    ) -> web.StreamResponse:
        """Not in the store: from the download under way, or a new one; relayed when the
        disk refuses. Unless `held`, the upstream's answer under `repo` decides."""
        download = self._downloads.get(digest)
        if download is not None and not held:  # fetched for some repository: this one's too?
            held = await self._confirm(
                upstream, repo, digest, None, _on_its_way(download, upstream), counted=False
            )
            download = self._downloads.get(digest)
        local = download is not None and download.verified
        self._metrics.cache_requests.labels("blob", "hit" if local else "miss").inc()
        if none_match(request, str(digest)):
            await self._size_uncached(upstream, repo, digest, held)  # BlobUnknown when it is not
            return not_modified(_blob_headers(digest))
        if request.method == "HEAD":
            return await self._head_uncached(request, upstream, repo, digest, held)
        if not local and not await self._storage.writable_now():
            return await self._passthrough(request, upstream, repo, digest)
        if not held and (self._downloads.get(digest) is not None or self._downloads.shared):
            # Joining a download for another repository, or one another replica may feed.
            joined = self._downloads.get(digest)
            held = await self._confirm(upstream, repo, digest, None, _on_its_way(joined, upstream))
        download = self._downloads.start_or_join(upstream, repo, digest)
        try:
            await download.started()
        except StoredElsewhere:
            return await self._stored_meanwhile(request, upstream, repo, digest)
        except Uncacheable:
            return await self._passthrough(request, upstream, repo, digest)
        if not held:  # this request's own download: the upstream sent it for this repo
            await self._fetched_here(download, upstream, repo)
        origin = "cache" if local else "upstream"
        return await self._stream(request, download, upstream, repo, origin)

    async def _fetched_here(self, download: Download, upstream: Upstream, repo: str) -> None:
        """Record what the upstream's answer under `repo` showed; a blob that landed from
        another download meanwhile (no temp file of this one) is confirmed instead."""
        if download.temp is None:
            await self._confirm(upstream, repo, download.digest)
        else:
            await self._holdings.record(upstream.name, repo, [str(download.digest)])

    async def _stored_meanwhile(
        self, request: web.Request, upstream: Upstream, repo: str, digest: Digest
    ) -> web.StreamResponse:
        """Another replica stored the blob as this one was about to fetch it (replicas)."""
        size = await self._storage.blob_size(digest)
        cached = None if size is None else await self._serve_cached(request, digest, size)
        if cached is not None:
            return cached
        found = await self._find_elsewhere(request, digest)
        if found is not None:
            return await self._from_store(request, digest, found)
        return await self._passthrough(request, upstream, repo, digest)

    async def _serve_cached(
        self, request: web.Request, digest: Digest, size: int
    ) -> web.StreamResponse | None:
        """The blob from the cache by sendfile, with the headers of the cold path (the
        digest as ETag, no mtime validators); None if the file went since it was found."""
        headers = _blob_headers(digest)
        if none_match(request, str(digest)):
            self._metrics.cache_requests.labels("blob", "hit").inc()
            return not_modified(headers)
        span = parse_range(request, size) if range_allowed(request, str(digest)) else None
        try:
            file = await open_off_loop(functools.partial(self._storage.open_blob, digest))
        except FileNotFoundError:  # evicted meanwhile: served as a miss
            return None
        self._metrics.cache_requests.labels("blob", "hit").inc()
        self._metrics.tier_hits.labels("local").inc()
        self.reading[digest] += 1  # eviction leaves it alone while it is sent
        try:
            resp = _sized_response(digest, size, span)
            await prepare(request, resp)
            if request.method == "HEAD":
                await resp.write_eof()
                return resp
            start, end = span if span is not None else (0, size - 1)
            return await _deliver(
                request, resp, self._send_cached(request, resp, file, start, end + 1 - start)
            )
        finally:
            self.reading[digest] -= 1
            if self.reading[digest] <= 0:
                del self.reading[digest]
            await close_off_loop(file)

    async def _send_cached(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        file: BinaryIO,
        start: int,
        length: int,
    ) -> None:
        """Send a span of a cached file, counting its bytes as they go (a client that
        leaves mid-blob is logged with the bytes it got)."""
        await send_file(request, resp, file, (start, length), self._counter(request, "cache"))

    async def _find_elsewhere(self, request: web.Request, digest: Digest) -> Found | None:
        """Ask the store where else the blob is (a HEAD, or a 304 to be, moves no body)."""
        byte_range = _single_range(request) if range_allowed(request, str(digest)) else None
        # `bytes=-0` needs only the size for its 416 (_from_store): a bucket may answer it
        # with the whole object (Ceph RGW does, as a 206).
        head = request.method == "HEAD" or none_match(request, str(digest))
        head = head or byte_range == "bytes=-0"
        return await self._storage.find_blob(digest, byte_range, head=head)

    async def _from_store(
        self, request: web.Request, digest: Digest, found: Found
    ) -> web.StreamResponse:
        """Answer from where the store says the blob is: a redirect, a size, or a body."""
        self._metrics.cache_requests.labels("blob", "hit").inc()
        if none_match(request, str(digest)):
            return not_modified(_blob_headers(digest))
        if isinstance(found, Redirect):
            headers = {"Docker-Content-Digest": str(digest), "Location": found.url}
            return web.Response(status=307, headers=headers)
        if isinstance(found, BlobSize):
            return await _head(request, digest, found.size)
        resp = web.StreamResponse(headers=_blob_headers(digest))
        resp.set_status(found.status)
        resp.content_length = found.length
        if found.content_range is not None:
            resp.headers["Content-Range"] = found.content_range
        try:
            await prepare(request, resp)
        except BaseException:
            await found.close()
            raise
        if isinstance(found, SpooledBlob):
            return await _deliver(request, resp, self._send_spooled(request, resp, found))
        return await _deliver(request, resp, self._pipe(request, resp, found))

    async def _send_spooled(
        self, request: web.Request, resp: web.StreamResponse, found: SpooledBlob
    ) -> None:
        """The store's file as it fills, by sendfile (no copy through Python)."""
        try:
            counted = self._counter(request, "cache")
            async for span in found.spans():
                await send_file(request, resp, found.file, span, counted)
        except StoreReadError as exc:
            raise TransferAborted(str(exc)) from None
        finally:
            await found.close()

    async def _pipe(
        self, request: web.Request, resp: web.StreamResponse, found: BlobStream
    ) -> None:
        try:
            async for chunk in found.chunks():
                await resp.write(chunk)
                self._sent(request, "cache", len(chunk))
        except StoreReadError as exc:
            raise TransferAborted(str(exc)) from None
        finally:
            await found.close()

    async def _passthrough(
        self, request: web.Request, upstream: Upstream, repo: str, digest: Digest
    ) -> web.StreamResponse:
        """Relay the blob uncached (whole: a range cannot be verified), checked against
        its digest before the last chunk goes out."""
        source = await upstream.open_blob(repo, str(digest))
        resp = web.StreamResponse(headers=_blob_headers(digest))
        if source.length is not None:
            resp.content_length = source.length
        try:
            await prepare(request, resp)
        except BaseException:
            source.release()
            raise
        return await _deliver(
            request, resp, self._relay(request, resp, source, upstream.name, digest, 0, None, True)
        )

    async def _relay(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        source: BlobBody,
        upstream: str,
        digest: Digest,
        start: int,
        end: int | None,
        verify: bool,
    ) -> None:
        """Send bytes `start`..`end` of the blob from an upstream body (which may start
        mid-blob, at its `offset`); with `verify`, hash the whole blob and hold the last
        chunk back until the hash matches. Its bytes count as received from `upstream`."""
        offset = source.offset
        hasher = digest.hasher()
        held, pos = b"", offset
        received = self._metrics.upstream_bytes.labels(upstream)
        async with source:
            try:
                async for chunk in source.chunks(READ_CHUNK):
                    received.inc(len(chunk))
                    if verify:
                        hasher.update(chunk)
                    low = max(start - pos, 0)
                    high = len(chunk) if end is None else min(len(chunk), end + 1 - pos)
                    pos += len(chunk)
                    if low < high:
                        await self._send(request, resp, held)
                        held = chunk[low:high]
                    if not verify and end is not None and pos > end:
                        break
            except BODY_ERRORS as exc:
                raise TransferAborted(f"upstream broke: {type(exc).__name__}") from None
        if verify and (offset != 0 or hasher.hexdigest() != digest.hex):
            self._metrics.digest_mismatches.labels("blob").inc()
            raise TransferAborted("upstream bytes do not match the digest")
        await self._send(request, resp, held)

    async def _send(self, request: web.Request, resp: web.StreamResponse, chunk: bytes) -> None:
        if chunk:
            await resp.write(chunk)
            self._sent(request, "upstream", len(chunk))

    def _sent(self, request: web.Request, origin: str, length: int) -> None:
        """Count body bytes that went out: in the metric, and for the access line."""
        self._metrics.served_bytes.labels(origin).inc(length)
        request[sent_key] = request.get(sent_key, 0) + length

    def _counter(self, request: web.Request, origin: str) -> Callable[[int], None]:
        """`_sent` for a file sent in parts, told of each part as it goes out."""
        return functools.partial(self._sent, request, origin)

    async def _size_uncached(
        self, upstream: Upstream, repo: str, digest: Digest, held: bool
    ) -> int | None:
        """The size of a blob not in the cache: from its download (when the repository
        holds it), or an upstream HEAD under the repository."""
        download = self._downloads.get(digest) if held else None
        size = download.size if download is not None else None
        if size is None:
            size = await self._sizes.size(upstream, repo, digest)
            await self._holdings.record(upstream.name, repo, [str(digest)])
        return size

    async def _head_uncached(
        self, request: web.Request, upstream: Upstream, repo: str, digest: Digest, held: bool
    ) -> web.StreamResponse:
        size = await self._size_uncached(upstream, repo, digest, held)
        return await _head(request, digest, size)

    async def _stream(
        self,
        request: web.Request,
        download: Download,
        upstream: Upstream,
        repo: str,
        origin: str,
    ) -> web.StreamResponse:
        """Send the blob from a download's file as its bytes arrive; `origin` (cache or
        upstream) labels them in the served-bytes metric."""
        size = download.size
        span = _span(request, download.digest, size)
        resp = _sized_response(download.digest, size, span)
        if span is not None and not download.verified:
            # A range can end before the blob does: its bytes go out unverified. (A whole
            # body is held one byte short of complete until the hash matches.)
            resp.headers["Cache-Control"] = UNVERIFIED
        start, end = span if span is not None else (0, None)
        await prepare(request, resp)

        async def body() -> None:
            pos = start
            file = await download.open_file()
            try:
                counted = self._counter(request, origin)
                async for offset, length in download.spans(start, end):
                    await send_file(request, resp, file, (offset, length), counted)
                    pos = offset + length
            except CacheWriteFailed:
                # The disk filled up under the download: finish this client from upstream.
                offset = 0 if span is None else pos
                source = await upstream.open_blob(repo, str(download.digest), offset)
                await self._relay(
                    request, resp, source, upstream.name, download.digest, pos, end, span is None
                )
            except RegistryError as exc:
                raise TransferAborted(exc.message) from None
            finally:
                await close_off_loop(file)

        return await _deliver(request, resp, body())


def _on_its_way(download: Download | None, upstream: Upstream) -> bool:
    """Whether the blob's bytes are still to come for this upstream: none here yet, or a
    download started for it under way. (Bytes that landed, or that another upstream's
    download brings, count as this upstream's only once it sent them itself.)"""
    return download is None or (download.upstream == upstream.name and not download.done)


class TransferAborted(Exception):
    """The body cannot be completed truthfully: the client's connection must be cut."""


async def _deliver(
    request: web.Request, resp: web.StreamResponse, body: Awaitable[None]
) -> web.StreamResponse:
    """Send a prepared response's body; on failure cut the connection, quietly.

    With the headers gone, a cut connection is the only honest signal left: the client
    sees a short body, never a complete-looking one with wrong bytes.
    """
    try:
        await body
    except (TransferAborted, RegistryError) as exc:
        log.warning("aborting blob to client: %s", exc)
        request[outcome_key] = "aborted"
        if request.transport is not None:
            request.transport.abort()
        return resp
    except ConnectionError:  # the client went away; nothing to tell anyone
        request[outcome_key] = "client_closed"
        return resp
    await resp.write_eof()
    return resp


def _blob_headers(digest: Digest) -> dict[str, str]:
    return {
        **digest_headers(str(digest)),
        "Content-Type": OCTET_STREAM,
        "Accept-Ranges": "bytes",
        "Cache-Control": IMMUTABLE,
    }


async def _head(request: web.Request, digest: Digest, size: int | None) -> web.StreamResponse:
    """The headers a GET of the blob would get, its Range applied to the size as for a
    cached blob (a 206, or a 416): a HEAD answers alike whatever is cached where."""
    resp = _sized_response(digest, size, _span(request, digest, size))
    await prepare(request, resp)
    await resp.write_eof()
    return resp


def _span(request: web.Request, digest: Digest, size: int | None) -> tuple[int, int] | None:
    """The request's range of a blob of `size` bytes, None for the whole blob (a 416 for
    one outside it). Without a known size a range cannot be checked: the whole blob goes
    (which HTTP allows)."""
    if size is None or not range_allowed(request, str(digest)):
        return None
    return parse_range(request, size)


def _sized_response(
    digest: Digest, size: int | None, span: tuple[int, int] | None
) -> web.StreamResponse:
    """A blob response's status and length: 206 with Content-Range for a span."""
    resp = web.StreamResponse(headers=_blob_headers(digest))
    if span is not None and size is not None:
        resp.set_status(206)
        resp.headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
        resp.content_length = span[1] - span[0] + 1
    elif size is not None:
        resp.content_length = size
    return resp
