"""A small synchronous S3 client for tests: botocore (which aiobotocore brings), so that
what the tests see in a bucket is read by other code than the mirror's own."""

from __future__ import annotations

from typing import Any

import botocore.session
from botocore.config import Config


class S3:
    """The few bucket operations tests need, on one endpoint with one key pair."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, region: str) -> None:
        session = botocore.session.get_session()
        self.client: Any = session.create_client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, bucket: str) -> None:
        self.client.create_bucket(Bucket=bucket)

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=body)

    def get(self, bucket: str, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def delete(self, bucket: str, key: str) -> None:
        self.client.delete_object(Bucket=bucket, Key=key)

    def delete_bucket(self, bucket: str) -> None:
        self.client.delete_bucket(Bucket=bucket)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under `prefix`, in order."""
        found: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            found += [item["Key"] for item in page.get("Contents", [])]
        return found

    def multipart_uploads(self, bucket: str) -> list[dict[str, Any]]:
        """The multipart uploads begun and neither completed nor aborted."""
        return list(self.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))

    def empty_and_delete_bucket(self, bucket: str) -> None:
        for upload in self.multipart_uploads(bucket):
            self.client.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        for key in self.keys(bucket):
            self.delete(bucket, key)
        self.delete_bucket(bucket)
