"""Where the cache lives: a directory, or a directory in front of an S3 bucket.

    base.py         CacheStore: what blobs, manifests, downloads and eviction use
    filesystem.py   Storage: the directory is the whole cache (storage.s3 unset)
    tiered.py       TieredStorage: the directory as a local tier in front of the bucket
    sharing.py      BucketSharing: the bucket's chores among processes (Alone by default)
    hostshare.py    HostShare: ... among the workers of one host, by file locks
    s3/bucket.py    Bucket: one S3 bucket through aiobotocore (calls, health, metrics)
    s3/keys.py      KeyLayout: the bucket's keys, both ways
    s3/upload.py    BucketUpload: a download's temp file copied into the bucket
    s3/catchup.py   Unsent: what the local tier kept while the bucket was down, sent after
    s3/read.py      BucketStream: one bucket GET streamed, the local tier filled
    s3/index.py     BucketIndex: last reads of the bucket's blobs, and its eviction

Nothing above `CacheStore` knows which backend it talks to; `new_store` chooses.
"""

from __future__ import annotations

from mirror.config import StorageConfig
from mirror.observe.metrics import Metrics
from mirror.storage.base import CacheStore
from mirror.storage.filesystem import Storage
from mirror.storage.sharing import BucketSharing

__all__ = ["CacheStore", "Storage", "new_store"]


def new_store(
    config: StorageConfig, metrics: Metrics, sharing: BucketSharing | None = None
) -> CacheStore:
    """The store `storage` in the config asks for (not opened yet); a bucket's chores are
    shared as `sharing` says (replicas), else done alone."""
    if config.s3 is None:
        return Storage(config.path, config.max_size)
    from mirror.storage.tiered import TieredStorage

    return TieredStorage(config.path, config.max_size, config.s3, metrics, sharing)
