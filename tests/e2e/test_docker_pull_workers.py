"""A real Docker daemon pulls through a mirror of two worker processes, cold then warm.

    dockerd --registry-mirror -> mirror (workers: 2, + redis) -> fake Docker Hub -> distribution

Docker opens several connections at once for the layers, so both workers serve the pull;
the access lines (JSON, with the worker's index) show it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images import SeededImage, seed
from tests.resilience_helpers import write_config
from tests.services import (
    DistributionRegistry,
    DockerDaemon,
    FakeHubProcess,
    MirrorProcess,
    RedisServer,
    missing_tools,
    wait_for,
)

MISSING = missing_tools()
MIB = 1024 * 1024

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(MISSING), reason=f"e2e needs {', '.join(MISSING)} on this machine"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-workers")


@pytest.fixture(scope="module")
def images(workdir: Path) -> Iterator[tuple[FakeHubProcess, dict[str, SeededImage]]]:
    with DistributionRegistry(workdir / "registry") as registry:
        seeded = seed(registry.url, large_size=16 * MIB)
        with FakeHubProcess(registry.url, workdir=workdir / "fakehub") as hub:
            yield hub, seeded


@pytest.fixture(scope="module")
def mirror(
    workdir: Path, images: tuple[FakeHubProcess, dict[str, SeededImage]]
) -> Iterator[MirrorProcess]:
    hub, _ = images
    config = write_config(workdir / "mirror.yml", {"workers": 2, "log": {"format": "json"}})
    with RedisServer(workdir / "redis") as redis:
        args = ["--config", str(config)]
        with MirrorProcess(workdir / "mirror", hub.registry_url, redis.url, args) as mirror:
            wait_for("both workers", lambda: serving_workers(mirror) == {1, 2})
            yield mirror


@pytest.fixture(scope="module")
def docker(workdir: Path, mirror: MirrorProcess) -> Iterator[DockerDaemon]:
    with DockerDaemon(workdir / "docker", mirror.url) as daemon:
        yield daemon


def records(mirror: MirrorProcess) -> list[dict[str, object]]:
    lines = mirror.log_path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def serving_workers(mirror: MirrorProcess) -> set[object]:
    return {r.get("worker") for r in records(mirror) if str(r["message"]).startswith("serving on")}


def pull_everything(docker: DockerDaemon, images: dict[str, SeededImage]) -> None:
    for name, image in images.items():
        done = docker.docker("pull", image.docker_name, check=False, timeout=600)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"docker pull {name} failed:\n{output}"
        assert f"Digest: {image.digest}" in output, output


def test_docker_pulls_through_two_workers_cold_then_warm(
    docker: DockerDaemon,
    mirror: MirrorProcess,
    images: tuple[FakeHubProcess, dict[str, SeededImage]],
) -> None:
    hub, seeded = images
    pull_everything(docker, seeded)
    docker.docker("rmi", *(image.docker_name for image in seeded.values()), check=False)
    hub.reset()
    pull_everything(docker, seeded)
    stats = hub.stats()
    assert (stats["blob_get"], stats["cdn_get"]) == (0, 0), "the warm pull reached the upstream"

    blob_lines = [r for r in records(mirror) if "/blobs/" in str(r.get("path", ""))]
    by_worker = {w: sum(1 for r in blob_lines if r["worker"] == w) for w in (1, 2)}
    print(f"blob requests by worker: {by_worker}")
    assert all(by_worker.values()), f"one worker served no blob: {by_worker}"
    assert not [r for r in records(mirror) if r["level"] == "error"]
