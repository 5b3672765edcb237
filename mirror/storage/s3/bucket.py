"""One S3 bucket, through aiobotocore: the calls the tiers need, and their health.

Every call goes through `_call`, which counts it (operation, status), times it, and turns
what means "the bucket is not answering" (connection errors, timeouts, 5xx after botocore's
retries with backoff and jitter) into `BucketUnavailable` while flipping `up` to False.
The caller then serves from the local tier or upstream; a background probe (HeadBucket
every PROBE_INTERVAL) brings `up` back, so no request waits on a bucket that is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from mirror.config import ConfigError
from mirror.config.s3 import S3Config
from mirror.observe.metrics import Metrics
from mirror.storage.s3.keys import KeyLayout
from mirror.storage.s3.partbody import PartBody

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import (
        CompletedPartTypeDef,
        GetObjectOutputTypeDef,
        ListObjectsV2OutputTypeDef,
    )

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Mapping[str, Any])
# Attempts per call (botocore's "standard" mode: exponential backoff with full jitter).
MAX_ATTEMPTS = 3
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 30.0
# While the bucket is down, it is probed this often.
PROBE_INTERVAL = 5.0
POOL_CONNECTIONS = 64
# A request in a client's path waits this long (seconds) in all for the bucket's answer
# head (retries included), then the bucket counts as down: a bucket that hangs rather
# than refuses would hold every pull for MAX_ATTEMPTS read timeouts, a minute and a half.
ANSWER_DEADLINE = 10.0
# What an upload's request body may take on top of that: a part (or a small blob's one
# PutObject) must go at this many bytes a second at least, 8 MiB parts 8 s more (two
# parts are in flight at once: a link that carries under 2 MiB/s to the bucket cannot
# keep it filled anyway). A bucket slower than that counts as down, as one that hangs.
SEND_RATE = 1024 * 1024
# CompleteMultipartUpload: the server stitches the parts, longer the more there are
# (S3 may take a while, sending whitespace meanwhile): this much more per part.
COMPLETE_PER_PART = 0.02


class BucketUnavailable(Exception):
    """The bucket did not answer (unreachable, timed out, or a 5xx after retries)."""


# Refusals that pass of themselves (timeout, throttling): at start, the bucket is down.
TRANSIENT = frozenset({408, 429})
# What a call on the bucket may raise: down, or an answer other than the one expected.
S3_ERRORS = (BucketUnavailable, ClientError, BotoCoreError)


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    modified: float


@dataclass(frozen=True, slots=True)
class PendingUpload:
    key: str
    upload_id: str
    initiated: float


class Bucket:
    """The bucket of `storage.s3`, and whether it answers."""

    def __init__(self, config: S3Config, metrics: Metrics) -> None:
        self.config = config
        self.name = config.bucket
        self.keys = KeyLayout(config.prefix)
        self._metrics = metrics
        self._stack = AsyncExitStack()
        self._client: S3Client | None = None
        self.up = True
        self._prober: asyncio.Task[None] | None = None
        self._closed = False
        # Multipart uploads whose abort failed while the bucket was down: (key, upload id).
        self._orphans: list[tuple[str, str]] = []
        # Called each time the bucket answers again after it did not.
        self.on_up: Callable[[], None] | None = None
        self.answer_deadline = ANSWER_DEADLINE
        self.send_rate = SEND_RATE
        metrics.registry.register(metrics.s3_up)
        metrics.s3_up.set(1)

    # --- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        """Create the client and check the bucket: a missing bucket or refused credentials
        raise ConfigError (the mirror must not start); an unreachable one only marks it down."""
        cfg = self.config
        config = AioConfig(
            s3={
                "addressing_style": "path" if cfg.path_style else "virtual",
                # The body is not hashed into the signature (UNSIGNED-PAYLOAD): every
                # object is a blob named by its digest and hashed on each read back
                # (spool.py), so a second SHA-256 of each part here (on the event loop)
                # and another in the S3 server bought nothing but about a CPU-second
                # per GiB. The signature still covers the method, key and headers.
                "payload_signing_enabled": False,
            },
            # SigV4 everywhere, presigned URLs included (botocore may pick V2 for them).
            signature_version="s3v4",
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            max_pool_connections=POOL_CONNECTIONS,
            # Checksums only where S3 requires them: many S3-compatible servers reject
            # the newer default (CRC trailers), and every blob is verified by digest anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3",
                region_name=cfg.region,
                endpoint_url=cfg.endpoint,
                aws_access_key_id=cfg.access_key_id,
                aws_secret_access_key=cfg.secret_access_key,
                config=config,
            )
        )
        try:
            await self.check()
        except ConfigError:
            await self._stack.aclose()  # the mirror stops: the client's session with it
            raise

    async def close(self) -> None:
        self._closed = True
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
        await self._stack.aclose()

    @property
    def client(self) -> S3Client:
        assert self._client is not None, "the bucket is not open"
        return self._client

    async def check(self) -> None:
        """HeadBucket, naming the failing check in a ConfigError: only what the operator
        must fix (no such bucket, refused credentials, another refusal). What passes (a
        5xx, throttling, a timeout) starts the mirror with the bucket down, as one that
        is unreachable: exit status 2 is taken as final (systemd, the supervisor)."""
        try:
            await self._call("HeadBucket", lambda: self.client.head_bucket(Bucket=self.name))
        except NoCredentialsError:
            raise ConfigError(
                "storage.s3.access_key_id", "no credentials given and none in the AWS chain"
            ) from None
        except ClientError as exc:
            status = _status(exc)
            if status in TRANSIENT:
                self._failed(f"HeadBucket answered {status}")
                log.warning(
                    "S3 bucket %s answered %d at start: serving uncached", self.name, status
                )
                return
            if status == 404:
                raise ConfigError(
                    "storage.s3.bucket", f"no bucket {self.name!r} at the endpoint"
                ) from None
            if status in (401, 403):
                raise ConfigError(
                    "storage.s3.access_key_id",
                    f"the credentials are refused for bucket {self.name!r} ({status})",
                ) from None
            raise ConfigError("storage.s3.bucket", f"HeadBucket answered {status}") from None
        except BucketUnavailable as exc:
            log.warning(
                "S3 bucket %s not reachable at start (%s): serving uncached", self.name, exc
            )

    async def up_now(self) -> bool:
        """Does the bucket answer (as the last call or probe found)?"""
        return self.up

    async def _probe_until_up(self) -> None:
        """HeadBucket until the bucket answers, then abort the uploads left open meanwhile."""
        while True:
            while not self.up:
                await asyncio.sleep(PROBE_INTERVAL)
                try:
                    await self._call(
                        "HeadBucket", lambda: self.client.head_bucket(Bucket=self.name)
                    )
                except Exception as exc:  # the probe must outlive any failure: the way back
                    log.debug("S3 bucket probe failed: %s", type(exc).__name__)
            await self._abort_orphans()
            if self.up:
                return

    def abort_later(self, key: str, upload_id: str) -> None:
        """An upload that could not be aborted (the bucket is down): abort it once the
        bucket answers again."""
        self._orphans.append((key, upload_id))

    async def _abort_orphans(self) -> None:
        orphans, self._orphans = self._orphans, []
        for key, upload_id in orphans:
            try:
                await self.abort_multipart(key, upload_id)
            except BucketUnavailable:
                self._orphans.append((key, upload_id))
            except (ClientError, BotoCoreError) as exc:  # NoSuchUpload: gone already
                log.debug("upload of %s not aborted: %s", key, type(exc).__name__)

    def _failed(self, why: str) -> None:
        if self.up:
            log.error("S3 bucket %s not answering (%s): serving uncached", self.name, why)
            self._metrics.s3_up.set(0)
        self.up = False
        if not self._closed and (self._prober is None or self._prober.done()):
            self._prober = asyncio.create_task(self._probe_until_up())

    def _succeeded(self) -> None:
        if self.up:
            return
        log.warning("S3 bucket %s answers again", self.name)
        self._metrics.s3_up.set(1)
        self.up = True
        if self.on_up is not None:
            self.on_up()

    def count(self, operation: str, status: str, started: float) -> None:
        """One request in the S3 metrics: the client's, or one made outside it (a presigned
        GET)."""
        self._metrics.s3_requests.labels(operation, status).inc()
        self._metrics.s3_duration.labels(operation).observe(time.monotonic() - started)

    def unreachable(self, operation: str, exc: BaseException) -> BucketUnavailable:
        """A request made outside the client (a presigned GET) got no answer: the bucket
        counts as down, as after a failed call. Returns the exception to raise."""
        self._failed(f"{operation}: {type(exc).__name__}")
        return BucketUnavailable(type(exc).__name__)

    async def _call(
        self, operation: str, call: Callable[[], Awaitable[T]], deadline: float | None = None
    ) -> T:
        started = time.monotonic()
        status = "error"
        try:
            async with asyncio.timeout(deadline):
                result = await call()
            status = str(result.get("ResponseMetadata", {}).get("HTTPStatusCode", "ok"))
            self._succeeded()
            return result
        except ClientError as exc:
            code = _status(exc)
            status = str(code)
            if code >= 500:
                self._failed(f"{operation} answered {code}")
                raise BucketUnavailable(f"{operation} answered {code}") from None
            self._succeeded()
            raise
        except NoCredentialsError:
            raise
        except (TimeoutError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            self._failed(type(exc).__name__)
            raise BucketUnavailable(type(exc).__name__) from None
        finally:
            self.count(operation, status, started)

    # --- objects ---------------------------------------------------------------------------
    async def get(self, key: str, byte_range: str | None = None) -> GetObjectOutputTypeDef | None:
        """The object's response (body still to read), or None when there is none."""

        def call() -> Awaitable[GetObjectOutputTypeDef]:
            if byte_range:
                return self.client.get_object(Bucket=self.name, Key=key, Range=byte_range)
            return self.client.get_object(Bucket=self.name, Key=key)

        try:
            return await self._call("GetObject", call, self.answer_deadline)
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise

    async def size(self, key: str) -> int | None:
        """HeadObject: the object's size, or None when there is none."""
        try:
            head = await self._call(
                "HeadObject",
                lambda: self.client.head_object(Bucket=self.name, Key=key),
                self.answer_deadline,
            )
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise
        return head["ContentLength"]

    def send_deadline(self, size: int) -> float:
        """How long a request carrying `size` bytes may take, retries included."""
        return self.answer_deadline + size / self.send_rate

    async def put(
        self, key: str, body: bytes | PartBody, content_type: str, *, answering: bool = False
    ) -> None:
        """PutObject, held to the send deadline of its size; `answering`: a client waits on
        it (a manifest), so held to the answer deadline."""
        await self._call(
            "PutObject",
            lambda: self.client.put_object(
                Bucket=self.name, Key=key, Body=_blob(body), ContentType=content_type
            ),
            self.answer_deadline if answering else self.send_deadline(len(body)),
        )
        self._metrics.s3_bytes.labels("sent").inc(len(body))

    async def delete(self, key: str) -> None:
        await self._call(
            "DeleteObject", lambda: self.client.delete_object(Bucket=self.name, Key=key)
        )

    async def presign(self, key: str, ttl: float) -> str:
        """A GET URL for the object, valid `ttl` seconds (signed here: no request)."""
        return await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.name, "Key": key}, ExpiresIn=int(ttl)
        )

    async def objects(self, prefix: str) -> AsyncIterator[StoredObject]:
        """Every object under `prefix` (ListObjectsV2, a page at a time)."""
        token: str | None = None
        while True:
            page = await self._call("ListObjectsV2", lambda t=token: self._list_page(prefix, t))  # type: ignore[misc]
            for item in page.get("Contents", []):
                modified = item.get("LastModified")
                yield StoredObject(item["Key"], item.get("Size", 0), _timestamp(modified))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _list_page(self, prefix: str, token: str | None) -> Awaitable[ListObjectsV2OutputTypeDef]:
        if token:
            return self.client.list_objects_v2(
                Bucket=self.name, Prefix=prefix, ContinuationToken=token
            )
        return self.client.list_objects_v2(Bucket=self.name, Prefix=prefix)

    # --- multipart -------------------------------------------------------------------------
    # Each call is held to a deadline: a download's upload holds one of the process's two
    # part buffers, its blob's lease and claim meanwhile (a bucket that hangs held them for
    # MAX_ATTEMPTS read timeouts per call, minutes in all).
    async def create_multipart(self, key: str) -> str:
        created = await self._call(
            "CreateMultipartUpload",
            lambda: self.client.create_multipart_upload(
                Bucket=self.name, Key=key, ContentType="application/octet-stream"
            ),
            self.answer_deadline,
        )
        return created["UploadId"]

    async def upload_part(self, key: str, upload_id: str, number: int, body: PartBody) -> str:
        part = await self._call(
            "UploadPart",
            lambda: self.client.upload_part(
                Bucket=self.name, Key=key, UploadId=upload_id, PartNumber=number, Body=_blob(body)
            ),
            self.send_deadline(len(body)),
        )
        self._metrics.s3_bytes.labels("sent").inc(len(body))
        return part["ETag"]

    async def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None:
        parts: list[CompletedPartTypeDef] = [
            {"ETag": etag, "PartNumber": n} for n, etag in enumerate(etags, start=1)
        ]
        await self._call(
            "CompleteMultipartUpload",
            lambda: self.client.complete_multipart_upload(
                Bucket=self.name, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            ),
            self.answer_deadline + len(parts) * COMPLETE_PER_PART,
        )

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self._call(
            "AbortMultipartUpload",
            lambda: self.client.abort_multipart_upload(
                Bucket=self.name, Key=key, UploadId=upload_id
            ),
            self.answer_deadline,
        )

    async def pending_uploads(self, prefix: str) -> list[PendingUpload]:
        """Multipart uploads under `prefix` neither completed nor aborted."""
        found: list[PendingUpload] = []
        key_marker, id_marker = "", ""
        while True:
            page = await self._call(
                "ListMultipartUploads",
                lambda k=key_marker, i=id_marker: self.client.list_multipart_uploads(  # type: ignore[misc]
                    Bucket=self.name, Prefix=prefix, KeyMarker=k, UploadIdMarker=i
                ),
            )
            for upload in page.get("Uploads", []):
                found.append(
                    PendingUpload(
                        upload.get("Key", ""),
                        upload.get("UploadId", ""),
                        _timestamp(upload.get("Initiated")),
                    )
                )
            if not page.get("IsTruncated"):
                return found
            key_marker = page.get("NextKeyMarker", "")
            id_marker = page.get("NextUploadIdMarker", "")


def _status(exc: ClientError) -> int:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if isinstance(status, int):
        return status
    code = exc.response.get("Error", {}).get("Code", "")
    return 404 if code in ("NoSuchKey", "NoSuchBucket", "404") else 0


def _timestamp(value: datetime | None) -> float:
    return value.timestamp() if value is not None else 0.0


def _blob(body: bytes | PartBody) -> bytes | IO[bytes]:
    """A body as the client's stubs name it: botocore takes any object with `read` for a
    blob (botocore/validate.py), and aiohttp sends a payload as it is."""
    return body if isinstance(body, bytes) else cast("IO[bytes]", body)
