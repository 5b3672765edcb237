"""A real Docker daemon pulls every test image through a mirror whose cache is a bucket.

    dockerd ──> mirror (local tier + Ceph RGW bucket, redis) ──> fake hub ──> docker-registry

Cold round: every blob and manifest lands in the bucket under its digest. Then `docker rmi`,
the mirror stopped, its local tier thrown away, the mirror started again on the same port:
the warm round must ask the upstream for no blob at all, the bucket serves them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Round, pull_all, record
from tests.e2e.test_docker_pull import blob_digests
from tests.images import SeededImage
from tests.rgw import CephRGW, ceph_available
from tests.services import (
    DockerDaemon,
    FakeHubProcess,
    MirrorProcess,
    RedisServer,
    missing_tools,
    wait_for,
)

MISSING = missing_tools()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(MISSING), reason=f"e2e needs {', '.join(MISSING)} on this machine"),
    pytest.mark.skipif(not ceph_available(), reason="the S3 e2e needs Ceph RGW (make system-deps)"),
]


@pytest.fixture(scope="module")
def s3_bucket_e2e(rgw: CephRGW) -> Iterator[str]:
    s3 = rgw.s3()
    name = rgw.new_bucket_name()
    s3.create_bucket(name)
    yield name
    s3.empty_and_delete_bucket(name)


@pytest.fixture(scope="module")
def s3_mirror(
    e2e_dir: Path,
    e2e_hub: FakeHubProcess,
    e2e_redis: RedisServer,
    rgw: CephRGW,
    s3_bucket_e2e: str,
) -> Iterator[MirrorProcess]:
    workdir = e2e_dir / "mirror-s3"
    workdir.mkdir()
    secret = workdir / "s3-secret"
    secret.write_text(rgw.secret_key + "\n")
    config = {
        "storage": {
            "s3": {
                "endpoint": rgw.endpoint,
                "bucket": s3_bucket_e2e,
                "region": rgw.region,
                "prefix": "cache/",
                "path_style": True,
                "access_key_id": rgw.access_key,
                "secret_access_key_file": str(secret),
            }
        }
    }
    path = workdir / "mirror.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    # The Redis (tag records) is this module's own and outlives the restart below, as a shared
    # Redis would; the local tier does not.
    with MirrorProcess(
        workdir, e2e_hub.registry_url, e2e_redis.url, extra_args=["--config", str(path)]
    ) as mirror:
        yield mirror


@pytest.fixture(scope="module")
def s3_docker(e2e_dir: Path, s3_mirror: MirrorProcess) -> Iterator[DockerDaemon]:
    with DockerDaemon(e2e_dir / "docker-s3", s3_mirror.url) as docker:
        yield docker


@pytest.fixture(scope="module")
def s3_cold_round(
    s3_docker: DockerDaemon,
    e2e_hub: FakeHubProcess,
    e2e_images: dict[str, SeededImage],
    e2e_timings: dict[str, dict[str, float]],
) -> Round:
    e2e_hub.reset()
    pulls = pull_all(s3_docker, e2e_images)
    record(e2e_timings, "cold (S3)", pulls)
    return Round(pulls, e2e_hub.stats())


@pytest.fixture(scope="module")
def s3_warm_round(
    s3_cold_round: Round,
    s3_docker: DockerDaemon,
    s3_mirror: MirrorProcess,
    e2e_hub: FakeHubProcess,
    e2e_images: dict[str, SeededImage],
    e2e_timings: dict[str, dict[str, float]],
) -> Round:
    """Docker's images removed, the mirror restarted with an empty local tier, pulled again."""
    names = [image.docker_name for image in e2e_images.values()]
    s3_docker.docker("rmi", *names, check=False)
    assert not s3_docker.docker("images", "-q").stdout.split()
    s3_mirror.stop()
    shutil.rmtree(s3_mirror.workdir / "data")
    s3_mirror.start()
    e2e_hub.reset()
    pulls = pull_all(s3_docker, e2e_images)
    record(e2e_timings, "warm from the bucket", pulls)
    return Round(pulls, e2e_hub.stats())


def test_cold_pulls_through_the_s3_mirror(
    s3_cold_round: Round, e2e_images: dict[str, SeededImage]
) -> None:
    for name, pull in s3_cold_round.pulls.items():
        assert pull.returncode == 0, f"docker pull {name} failed:\n{pull.output}"
        assert pull.digest() == e2e_images[name].digest


def test_every_blob_lands_in_the_bucket_under_its_digest(
    s3_cold_round: Round, rgw: CephRGW, s3_bucket_e2e: str, e2e_images: dict[str, SeededImage]
) -> None:
    wanted = {f"cache/blobs/sha256/{d.removeprefix('sha256:')}" for d in blob_digests(e2e_images)}
    # A blob goes up after its clients have it: the last pull can end before its upload.
    wait_for(
        "every blob's upload to end",
        lambda: (
            not rgw.s3().multipart_uploads(s3_bucket_e2e)
            and wanted <= set(rgw.s3().keys(s3_bucket_e2e, "cache/blobs/"))
        ),
        timeout=60.0,
    )
    keys = set(rgw.s3().keys(s3_bucket_e2e, "cache/blobs/"))
    assert wanted <= keys, f"not in the bucket: {sorted(wanted - keys)}"
    manifests = set(rgw.s3().keys(s3_bucket_e2e, "cache/manifests/"))
    tops = {
        f"cache/manifests/sha256/{i.digest.removeprefix('sha256:')}" for i in e2e_images.values()
    }
    assert tops <= manifests
    assert rgw.s3().multipart_uploads(s3_bucket_e2e) == []


def test_warm_pulls_from_the_bucket_fetch_no_blob_upstream(
    s3_warm_round: Round, e2e_images: dict[str, SeededImage]
) -> None:
    for name, pull in s3_warm_round.pulls.items():
        assert pull.returncode == 0, f"docker pull {name} failed:\n{pull.output}"
        assert pull.digest() == e2e_images[name].digest
    stats = s3_warm_round.stats
    assert (stats["blob_get"], stats["cdn_get"]) == (0, 0), f"upstream blob requests: {stats}"
