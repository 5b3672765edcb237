"""Where the cache lives: a directory, or a directory in front of an S3 bucket.

    base.py        CacheStore: what blobs, manifests, downloads and eviction use
    filesystem.py  Storage: the directory is the whole cache (storage.s3 unset)
    s3.py          Bucket: one S3 bucket through aiobotocore (keys, health, metrics)
    upload.py      BucketUpload: a download's temp file copied into the bucket
    tiered.py      TieredStorage: the directory as a local tier in front of the bucket
    bucket_index.py  last reads of the bucket's objects, and its eviction
    s3config.py    the `storage.s3` section

Nothing above `CacheStore` knows which backend it talks to; `new_store` chooses.
"""

from __future__ import annotations

from mirror.config import StorageConfig
from mirror.observe.metrics import Metrics
from mirror.storage.base import CacheStore
from mirror.storage.filesystem import Storage

__all__ = ["CacheStore", "Storage", "new_store"]


def new_store(config: StorageConfig, metrics: Metrics) -> CacheStore:
    """The store `storage` in the config asks for (not opened yet)."""
    if config.s3 is None:
        return Storage(config.path, config.max_size)
    from mirror.storage.tiered import TieredStorage

    return TieredStorage(config.path, config.max_size, config.s3, metrics)
