"""A real Docker daemon pulls every test image through three replicas behind haproxy.

    dockerd ─► haproxy (round robin) ─► 3 mirror processes ─► fake hub ─► docker-registry
                                         │ shared: Ceph RGW bucket, Redis (Sentinel / Cluster)

Run once with Redis behind Sentinel (master, replica, sentinel) and once as a 3-master
Cluster. Every blob must come from the upstream exactly once across the three replicas,
however Docker's requests were spread over them; a second round after `docker rmi` asks the
upstream for no blob at all.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Round, pull_all, record
from tests.e2e.test_docker_pull import blob_digests
from tests.images import SeededImage
from tests.loadbalancer import HAProxy
from tests.rgw import CephRGW, ceph_available
from tests.services import DockerDaemon, FakeHubProcess, MirrorProcess, missing_tools

MISSING = missing_tools()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(MISSING), reason=f"e2e needs {', '.join(MISSING)} on this machine"),
    pytest.mark.skipif(not ceph_available(), reason="needs Ceph RGW (make system-deps)"),
]
REPLICAS = 3


@pytest.fixture(scope="module", params=["sentinel", "cluster"])
def shared_redis(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(topology, URL) of the session's Redis behind Sentinel, or its 3-master Cluster."""
    setup = request.getfixturevalue(f"redis_{request.param}")
    setup.flush()
    return str(request.param), str(setup.url)


@pytest.fixture(scope="module")
def replicas(
    e2e_dir: Path, e2e_hub: FakeHubProcess, rgw: CephRGW, shared_redis: tuple[str, str]
) -> Iterator[list[MirrorProcess]]:
    topology, redis_url = shared_redis
    workdir = e2e_dir / f"replicas-{topology}"
    workdir.mkdir()
    bucket = rgw.new_bucket_name()
    rgw.s3().create_bucket(bucket)
    secret = workdir / "cluster-secret"
    secret.write_text(os.urandom(24).hex() + "\n")
    s3_secret = workdir / "s3-secret"
    s3_secret.write_text(rgw.secret_key + "\n")
    started: list[MirrorProcess] = []
    try:
        for index in range(REPLICAS):
            replica = MirrorProcess(workdir / f"r{index}", e2e_hub.registry_url, redis_url)
            config = {
                "storage": {"s3": {
                    "endpoint": rgw.endpoint, "bucket": bucket, "region": rgw.region,
                    "path_style": True, "access_key_id": rgw.access_key,
                    "secret_access_key_file": str(s3_secret),
                }},
                "cluster": {"advertise_url": replica.url, "secret_file": str(secret),
                            "lease_ttl": "5s"},
            }  # fmt: skip
            path = replica.workdir / "mirror.yaml"
            path.write_text(json.dumps(config))
            replica.extra_args = ("--config", str(path))
            started.append(replica.start())
        yield started
    finally:
        for replica in started:
            replica.stop()
        rgw.s3().empty_and_delete_bucket(bucket)


@pytest.fixture(scope="module")
def balancer(replicas: list[MirrorProcess]) -> Iterator[HAProxy]:
    with HAProxy(replicas[0].workdir.parent / "haproxy", [r.url for r in replicas]) as lb:
        yield lb


@pytest.fixture(scope="module")
def lb_docker(balancer: HAProxy) -> Iterator[DockerDaemon]:
    with DockerDaemon(balancer.workdir.parent / "docker", balancer.url) as docker:
        yield docker


@pytest.fixture(scope="module")
def replica_rounds(
    lb_docker: DockerDaemon,
    e2e_hub: FakeHubProcess,
    e2e_images: dict[str, SeededImage],
    e2e_timings: dict[str, dict[str, float]],
    shared_redis: tuple[str, str],
) -> tuple[Round, Round]:
    """Every image pulled cold through the balancer; removed; pulled again."""
    e2e_hub.reset()
    cold = pull_all(lb_docker, e2e_images)
    record(e2e_timings, f"cold via 3 replicas, Redis {shared_redis[0]}", cold)
    cold_round = Round(cold, e2e_hub.stats())
    lb_docker.docker("rmi", *[i.docker_name for i in e2e_images.values()], check=False)
    assert not lb_docker.docker("images", "-q").stdout.split()
    e2e_hub.reset()
    warm = pull_all(lb_docker, e2e_images)
    record(e2e_timings, f"warm via 3 replicas, Redis {shared_redis[0]}", warm)
    return cold_round, Round(warm, e2e_hub.stats())


def test_every_image_pulls_through_three_replicas(
    replica_rounds: tuple[Round, Round], e2e_images: dict[str, SeededImage]
) -> None:
    for round_ in replica_rounds:
        for name, pull in round_.pulls.items():
            assert pull.returncode == 0, f"docker pull {name} failed:\n{pull.output}"
            assert pull.digest() == e2e_images[name].digest


def test_each_blob_fetched_once_across_the_replicas(
    replica_rounds: tuple[Round, Round], e2e_images: dict[str, SeededImage]
) -> None:
    cold, warm = replica_rounds
    by_digest = cold.stats["cdn_get_by_digest"]
    assert isinstance(by_digest, dict)
    missing = blob_digests(e2e_images) - set(by_digest)
    assert not missing, f"never fetched: {sorted(missing)}"
    repeated = {digest: n for digest, n in by_digest.items() if n != 1}
    assert not repeated, f"fetched more than once across the replicas: {repeated}"
    assert (warm.stats["blob_get"], warm.stats["cdn_get"]) == (0, 0), warm.stats


def test_requests_were_spread_over_every_replica(
    replica_rounds: tuple[Round, Round], replicas: list[MirrorProcess]
) -> None:
    for replica in replicas:
        with urllib.request.urlopen(replica.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        served = [
            line for line in text.splitlines()
            if line.startswith("mirror_http_requests_total{") and 'route="blob"' in line
        ]  # fmt: skip
        assert served, f"{replica.url} served no blob request: the balancer skipped it"
