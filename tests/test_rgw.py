"""The S3 server of record behaves as the storage tests assume: real signatures, objects
kept across a gateway restart, multipart uploads listed until completed or aborted."""

from __future__ import annotations

import botocore.exceptions
import pytest

from tests.rgw import CephRGW
from tests.s3client import S3


def test_objects_survive_a_gateway_restart(rgw: CephRGW, s3_bucket: str) -> None:
    s3 = rgw.s3()
    s3.put(s3_bucket, "blobs/sha256/aa", b"kept")
    rgw.stop_gateway()
    rgw.start_gateway()
    assert s3.get(s3_bucket, "blobs/sha256/aa") == b"kept"
    assert s3.keys(s3_bucket, "blobs/") == ["blobs/sha256/aa"]


def test_a_wrong_secret_is_refused(rgw: CephRGW, s3_bucket: str) -> None:
    wrong = S3(rgw.endpoint, rgw.access_key, "not-the-secret", rgw.region)
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        wrong.get(s3_bucket, "anything")
    assert raised.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_open_multipart_uploads_are_listed(rgw: CephRGW, s3_bucket: str) -> None:
    s3 = rgw.s3()
    upload = s3.client.create_multipart_upload(Bucket=s3_bucket, Key="blobs/sha256/bb")
    assert [u["Key"] for u in s3.multipart_uploads(s3_bucket)] == ["blobs/sha256/bb"]
    s3.client.abort_multipart_upload(
        Bucket=s3_bucket, Key="blobs/sha256/bb", UploadId=upload["UploadId"]
    )
    assert s3.multipart_uploads(s3_bucket) == []
