"""Fixtures for end-to-end pulls: a real Docker daemon pulling through the mirror.

    dockerd --registry-mirror=mirror -> mirror (+ redis) -> fake Docker Hub -> distribution

Every process is module-scoped: starting dockerd and seeding 270 MB of images is too slow
to repeat per test. Teardown runs in reverse order, so dockerd stops before the mirror.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.images import SeededImage, seed
from tests.services import (
    DistributionRegistry,
    DockerDaemon,
    FakeHubProcess,
    MirrorProcess,
    RedisServer,
)


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def e2e_registry(e2e_dir: Path) -> Iterator[DistributionRegistry]:
    """The content behind the fake hub: a plain distribution registry."""
    with DistributionRegistry(e2e_dir / "registry") as registry:
        yield registry


@pytest.fixture(scope="module")
def e2e_images(e2e_registry: DistributionRegistry) -> dict[str, SeededImage]:
    return seed(e2e_registry.url)


@pytest.fixture(scope="module")
def e2e_hub(
    e2e_dir: Path, e2e_registry: DistributionRegistry, e2e_images: dict[str, SeededImage]
) -> Iterator[FakeHubProcess]:
    with FakeHubProcess(e2e_registry.url, workdir=e2e_dir / "fakehub") as hub:
        yield hub


@pytest.fixture(scope="module")
def e2e_redis(e2e_dir: Path) -> Iterator[RedisServer]:
    with RedisServer(e2e_dir / "redis") as redis:
        yield redis


@pytest.fixture(scope="module")
def e2e_mirror(
    e2e_dir: Path, e2e_hub: FakeHubProcess, e2e_redis: RedisServer
) -> Iterator[MirrorProcess]:
    with MirrorProcess(e2e_dir / "mirror", e2e_hub.registry_url, e2e_redis.url) as mirror:
        yield mirror


@pytest.fixture(scope="module")
def e2e_docker(e2e_dir: Path, e2e_mirror: MirrorProcess) -> Iterator[DockerDaemon]:
    with DockerDaemon(e2e_dir / "docker", e2e_mirror.url) as docker:
        yield docker


@dataclass
class Pull:
    """One `docker pull`: how it went and how long it took."""

    name: str
    seconds: float
    returncode: int
    output: str

    def digest(self) -> str | None:
        for line in self.output.splitlines():
            if line.startswith("Digest: "):
                return line.removeprefix("Digest: ").strip()
        return None


@dataclass
class Round:
    """A round of pulls of every test image, with the fake hub's stats right after."""

    pulls: dict[str, Pull] = field(default_factory=dict)
    stats: dict[str, object] = field(default_factory=dict)


def pull_all(docker: DockerDaemon, images: dict[str, SeededImage]) -> dict[str, Pull]:
    pulls = {}
    for name, image in images.items():
        start = time.monotonic()
        # A bare official name: Docker asks its registry mirror, since it is a docker.io image.
        done = docker.docker("pull", image.docker_name, check=False, timeout=600)
        seconds = time.monotonic() - start
        pulls[name] = Pull(name, seconds, done.returncode, done.stdout + done.stderr)
    return pulls


@pytest.fixture(scope="module")
def e2e_timings(e2e_dir: Path) -> Iterator[dict[str, dict[str, float]]]:
    """Pull times by round; written to a JSON file whose path is printed (see with -s)."""
    timings: dict[str, dict[str, float]] = {}
    yield timings
    path = e2e_dir / "pull-timings.json"
    path.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"\npull timings: {path}")


def record(timings: dict[str, dict[str, float]], label: str, pulls: dict[str, Pull]) -> None:
    timings[label] = {name: round(pull.seconds, 3) for name, pull in pulls.items()}
    shown = ", ".join(f"{name} {pull.seconds:.2f}s" for name, pull in pulls.items())
    print(f"\n{label} pulls through the mirror: {shown}")


@pytest.fixture(scope="module")
def cold_round(
    e2e_docker: DockerDaemon,
    e2e_hub: FakeHubProcess,
    e2e_images: dict[str, SeededImage],
    e2e_timings: dict[str, dict[str, float]],
) -> Round:
    """Every image pulled once through an empty mirror."""
    e2e_hub.reset()
    pulls = pull_all(e2e_docker, e2e_images)
    record(e2e_timings, "cold", pulls)
    return Round(pulls, e2e_hub.stats())


@pytest.fixture(scope="module")
def warm_round(
    cold_round: Round,
    e2e_docker: DockerDaemon,
    e2e_hub: FakeHubProcess,
    e2e_images: dict[str, SeededImage],
    e2e_timings: dict[str, dict[str, float]],
) -> Round:
    """Every image removed from Docker, then pulled again: the mirror has them all now."""
    names = [image.docker_name for image in e2e_images.values()]
    e2e_docker.docker("rmi", *names, check=False)
    left = e2e_docker.docker("images", "-q").stdout.split()
    assert not left, f"docker rmi left images behind: {left}"
    e2e_hub.reset()
    pulls = pull_all(e2e_docker, e2e_images)
    record(e2e_timings, "warm", pulls)
    return Round(pulls, e2e_hub.stats())
