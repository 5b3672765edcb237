"""The signed endpoint other replicas stream blobs from, and the app's peer client.

    follower ── GET /_cluster/blobs/<digest>, Range: bytes=N-, signed ──► owner
    owner:   its download of that blob under way → the bytes from N as they arrive (the
             last one only once the digest matched, as for its own clients)
             else the blob in its local tier → the file from N
             else 404 BLOB_UNKNOWN (it never starts a download for a peer)

The endpoint answers only requests signed with the cluster secret (cluster/peerauth.py);
anything else is refused and counted. The answer is always a 206 whose Content-Range names
the first byte and the blob's size, so a follower that resumes checks where the bytes start.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import BinaryIO

from aiohttp import web

from mirror.cache.downloads import Download
from mirror.cluster import peerauth
from mirror.cluster.peers import UPSTREAM_UNKNOWN, PeerClient
from mirror.net.tls import peer_context
from mirror.oci.errors import BlobUnknown, RegistryError, Unauthorized
from mirror.oci.reference import Digest, parse_digest
from mirror.storage import CacheStore
from mirror.upstream.body import header_number
from mirror.util.threadfiles import close_off_loop, open_off_loop
from mirror.web.errors import error_response
from mirror.web.keys import config_key, downloads_key, metrics_key, peers_key, storage_key
from mirror.web.sendfile import send_file
from mirror.web.stamp import prepare

# Named as before the endpoint moved to the web layer: operators filter on it.
log = logging.getLogger("mirror.cluster.peers")

Spans = AsyncIterator[tuple[BinaryIO, int, int]]


async def peers_ctx(app: web.Application) -> AsyncIterator[None]:
    """`app[peers_key]`: the client replicas stream blobs with, or None without a cluster."""
    config = app[config_key]
    if config.cluster is None:
        app[peers_key] = None
        yield
        return
    cluster = config.cluster
    context = await asyncio.to_thread(peer_context, cluster.ca_file, cluster.client_pair)
    peers = PeerClient(
        cluster.secret,
        app[metrics_key].cluster,
        config.upstream.connect_timeout,
        config.upstream.read_timeout,
        context,
        advertise_url=config.cluster.advertise_url,
        max_blob_size=config.storage.max_blob_size,
    )
    app[peers_key] = peers
    try:
        yield
    finally:
        await peers.close()


async def peer_blob(request: web.Request) -> web.StreamResponse:
    """GET /_cluster/blobs/{digest}: see the module docstring."""
    cluster = request.app[config_key].cluster
    metrics = request.app[metrics_key].cluster
    signature = request.headers.get(peerauth.HEADER)
    if cluster is None or not peerauth.verify(
        cluster.secret, signature, request.method, request.raw_path
    ):
        metrics.peer_refused.inc()
        raise Unauthorized("replica requests need the cluster's signature")
    digest = parse_digest(request.match_info["digest"])
    offset = _offset(request)
    download = request.app[downloads_key].get(digest)
    if download is not None:
        try:
            await download.started()
        except BlobUnknown as exc:
            unknown = error_response(exc)
            unknown.headers[UPSTREAM_UNKNOWN] = "1"
            return unknown
        spans = _from_download(download, offset)
        return await _send(request, digest, offset, download.size, spans)
    storage = request.app[storage_key]
    size = await storage.blob_size(digest)
    if size is None:
        raise BlobUnknown(f"blob {digest} is neither here nor being fetched here")
    spans = _from_file(storage, digest, offset, size)
    return await _send(request, digest, offset, size, spans)


def _offset(request: web.Request) -> int:
    first = request.headers.get("Range", "").removeprefix("bytes=").partition("-")[0]
    return header_number(first) or 0


async def _send(
    request: web.Request, digest: Digest, offset: int, size: int | None, spans: Spans
) -> web.StreamResponse:
    metrics = request.app[metrics_key].cluster
    resp = web.StreamResponse(status=206)
    last = "*" if size is None else str(size - 1)
    resp.headers["Content-Range"] = f"bytes {offset}-{last}/{'*' if size is None else size}"
    if size is not None:
        resp.content_length = max(size - offset, 0)
    await prepare(request, resp)
    metrics.peer_streams.labels("out").inc()
    sent = metrics.peer_bytes.labels("out").inc
    try:
        async for file, start, length in spans:
            await send_file(request, resp, file, (start, length), sent)
    except (RegistryError, ConnectionError) as exc:
        # Headers are gone: cutting the connection is how the follower learns it broke.
        log.info("blob %s to a replica cut short: %s", digest, exc)
        if request.transport is not None:
            request.transport.abort()
        return resp
    await resp.write_eof()
    return resp


async def _from_download(download: Download, offset: int) -> Spans:
    """The download's bytes from `offset` as they land (the last one once verified)."""
    file = await download.open_file()
    try:
        async for start, length in download.spans(offset, None):
            yield file, start, length
    finally:
        await close_off_loop(file)


async def _from_file(storage: CacheStore, digest: Digest, offset: int, size: int) -> Spans:
    file = await open_off_loop(functools.partial(storage.open_blob, digest))
    try:
        if offset < size:
            yield file, offset, size - offset
    finally:
        await close_off_loop(file)
