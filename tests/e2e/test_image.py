"""The container image, built and run: the Dockerfile built offline on a Debian base made
with debootstrap, the mirror run from it, and a second Docker daemon pulling through it.

    debootstrap bookworm (python3) ─ docker import ─► base ─ docker build ─► mirror image
    dockerd #2 --registry-mirror ─► mirror container (host network, non-root, read-only)
                                       ─► fake Docker Hub ─► docker-registry

Both daemons are the test suite's own (vfs, no bridge): the container shares the host's
network and listens on a port of its own. The image is built with `--network none`, from a
wheelhouse put into a copy of the build context, so it needs no registry at all. The base's
root filesystem is cached between runs (tests/e2e/image_helpers.py); a cold cache runs
debootstrap, which may take minutes, hence the first test's longer timeout. Run with
`python -m pytest tests/e2e/test_image.py -q -s -m e2e` to see the image's size.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Round, pull_all
from tests.e2e.image_helpers import (
    COMPOSE,
    cache_dir,
    docker_build,
    docker_compose,
    host_network_compose,
    image_size,
    inspect,
    make_build_context,
    marker_environment,
    mib,
    process_ids,
    rootfs_tarball,
    wait_healthy,
)
from tests.images import SeededImage
from tests.services import DockerDaemon, FakeHubProcess, RedisServer, free_port, missing_tools

MISSING = missing_tools() + [tool for tool in ("debootstrap",) if shutil.which(tool) is None]
BASE_IMAGE = "mirror-test-base:bookworm"
IMAGE = "mirror:e2e"
IMAGES = ["busybox", "multiarch", "layers20", "large"]
USER_ID = 10001  # the Dockerfile's USER
# The added layers: a venv of the mirror and its dependencies, a user, a config file. The
# bound is generous (they are about 24 MiB): it catches a build stage's leftovers (pip's cache,
# the wheels, the source) ending up in the image.
ADDED_LIMIT = 80 * 1024 * 1024

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(MISSING), reason=f"e2e needs {', '.join(MISSING)} on this machine"),
]


@dataclass(frozen=True)
class Built:
    """The image built from the Dockerfile, and its base."""

    image: str
    base: str
    size: int
    base_size: int


@pytest.fixture(scope="module")
def builder(e2e_dir: Path) -> Iterator[DockerDaemon]:
    """The daemon that builds and runs the mirror's image (it pulls nothing)."""
    with DockerDaemon(e2e_dir / "builder", registry_mirror=None) as docker:
        yield docker


@pytest.fixture(scope="module")
def built(e2e_dir: Path, builder: DockerDaemon) -> Built:
    tarball = rootfs_tarball(cache_dir())
    builder.docker("import", str(tarball), BASE_IMAGE, timeout=280)
    target = marker_environment(builder, BASE_IMAGE)
    context = make_build_context(e2e_dir / "context", target)
    done = docker_build(builder, context, IMAGE, [f"BASE={BASE_IMAGE}"])
    assert done.returncode == 0, f"docker build failed:\n{(done.stdout + done.stderr)[-4000:]}"
    size, base_size = image_size(builder, IMAGE), image_size(builder, BASE_IMAGE)
    print(f"\nimage {IMAGE}: {mib(size)}, of which the base {mib(base_size)}, "
          f"the Dockerfile's layers {mib(size - base_size)}")  # fmt: skip
    return Built(IMAGE, BASE_IMAGE, size, base_size)


@dataclass(frozen=True)
class Running:
    name: str
    url: str


@pytest.fixture(scope="module")
def container(
    built: Built, builder: DockerDaemon, e2e_hub: FakeHubProcess, e2e_redis: RedisServer
) -> Iterator[Running]:
    """The mirror run from the image as compose and Kubernetes run it: read-only root, no
    capabilities, the cache on its volume; host network, since the daemon has no bridge."""
    name = f"mirror-e2e-{uuid.uuid4().hex[:8]}"
    port = free_port()
    builder.docker(
        "run", "-d", "--name", name, "--network", "host",
        "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        # The image's check every 30 s would make the test wait; the same command, sooner.
        "--health-interval", "1s",
        built.image, "serve", "--listen", f"127.0.0.1:{port}",
        "--upstream", e2e_hub.registry_url, "--redis", e2e_redis.url,
    )  # fmt: skip
    try:
        yield Running(name, f"http://127.0.0.1:{port}")
    finally:
        logs = builder.docker("logs", name, check=False)
        (builder.workdir / f"{name}.log").write_text(logs.stdout + logs.stderr)
        builder.docker("rm", "-f", "-v", name, check=False)


@pytest.fixture(scope="module")
def puller(e2e_dir: Path, container: Running) -> Iterator[DockerDaemon]:
    """A second daemon whose registry mirror is the containerised mirror."""
    with DockerDaemon(e2e_dir / "puller", container.url) as docker:
        yield docker


@pytest.fixture(scope="module")
def container_round(
    puller: DockerDaemon, e2e_hub: FakeHubProcess, e2e_images: dict[str, SeededImage]
) -> Round:
    e2e_hub.reset()
    pulls = pull_all(puller, e2e_images)
    shown = ", ".join(f"{name} {pull.seconds:.2f}s" for name, pull in pulls.items())
    print(f"\npulls through the containerised mirror: {shown}")
    return Round(pulls, e2e_hub.stats())


@pytest.mark.timeout(900)  # a cold cache runs debootstrap first: minutes
def test_image_builds_offline_on_a_debootstrap_base(built: Built, builder: DockerDaemon) -> None:
    config = inspect(builder, "--type", "image", built.image)["Config"]
    assert config["User"] == f"{USER_ID}:{USER_ID}"
    assert config["Entrypoint"] == ["mirror"]
    assert config["Healthcheck"]["Test"] == ["CMD", "python", "-m", "mirror.healthcheck"]
    assert built.size - built.base_size < ADDED_LIMIT, mib(built.size - built.base_size)


def test_image_runs_the_mirror_as_a_non_root_user(
    container: Running, builder: DockerDaemon
) -> None:
    state = inspect(builder, "--type", "container", container.name)["State"]
    assert state["Running"], state
    # The mirror process itself, seen from the host: no user namespace, so these are real.
    assert process_ids(int(state["Pid"])) == (USER_ID, USER_ID)
    done = builder.docker("exec", container.name, "id", "-u")
    assert done.stdout.strip() == str(USER_ID)


def test_healthcheck_goes_healthy(container: Running, builder: DockerDaemon) -> None:
    health = wait_healthy(builder, container.name)
    assert health.get("Status") == "healthy", health
    assert all(probe["ExitCode"] == 0 for probe in health["Log"]), health["Log"]


@pytest.mark.parametrize("name", IMAGES)
def test_pull_through_the_containerised_mirror(
    name: str, container_round: Round, e2e_images: dict[str, SeededImage]
) -> None:
    pull = container_round.pulls[name]
    assert pull.returncode == 0, f"docker pull {name} failed:\n{pull.output}"
    assert pull.digest() == e2e_images[name].digest


def test_each_blob_came_from_the_hub_once(
    container_round: Round, e2e_images: dict[str, SeededImage]
) -> None:
    wanted = set()
    for image in e2e_images.values():
        wanted.add(image.config)
        wanted.update(digest for digest, _ in image.layers)
    by_digest = container_round.stats["cdn_get_by_digest"]
    assert isinstance(by_digest, dict)
    assert wanted <= set(by_digest), f"never fetched: {sorted(wanted - set(by_digest))}"
    repeated = {digest: n for digest, n in by_digest.items() if n != 1}
    assert not repeated, f"fetched from the hub more than once: {repeated}"


def test_the_cache_is_on_the_volume(
    container_round: Round, container: Running, builder: DockerDaemon
) -> None:
    # After the pulls: the blobs are in /var/lib/mirror (the image's VOLUME), written by
    # the mirror's own user on a read-only root filesystem.
    mounts = inspect(builder, "--type", "container", container.name)["Mounts"]
    assert [m["Destination"] for m in mounts] == ["/var/lib/mirror"]
    done = builder.docker(
        "exec", container.name, "python", "-c",
        "import os; print(sum(len(f) for _, _, f in os.walk('/var/lib/mirror')))",
    )  # fmt: skip
    assert int(done.stdout) > 0
    done = builder.docker("exec", container.name, "touch", "/opt/x", check=False)
    assert done.returncode != 0, "the root filesystem is writable"


# --- deploy/compose.yaml ------------------------------------------------------------------


@dataclass(frozen=True)
class Composed:
    container: str
    url: str


@pytest.fixture(scope="module")
def composed(
    e2e_dir: Path,
    built: Built,
    builder: DockerDaemon,
    e2e_hub: FakeHubProcess,
    e2e_redis: RedisServer,
) -> Iterator[Composed]:
    """The compose file's mirror service, started by docker-compose on the image built
    above (tagged as the file names it; no build), with host networking."""
    port = free_port()
    # Redis database 1: the `docker run` mirror keeps its records in 0.
    redis_url = e2e_redis.url.rsplit("/", 1)[0] + "/1"
    flags = ["--listen", f"127.0.0.1:{port}", "--upstream", e2e_hub.registry_url]
    compose = host_network_compose([*flags, "--redis", redis_url])
    builder.docker("tag", built.image, compose["services"]["mirror"]["image"])
    compose_file = e2e_dir / "compose.host-network.yaml"
    compose_file.write_text(json.dumps(compose, indent=2))  # JSON is YAML
    try:
        docker_compose(builder, compose_file, "up", "-d", "--no-build")
        container = docker_compose(builder, compose_file, "ps", "-q", "mirror").stdout.strip()
        yield Composed(container, f"http://127.0.0.1:{port}")
    finally:
        logs = docker_compose(builder, compose_file, "logs", "--no-color", check=False)
        (builder.workdir / "compose.log").write_text(logs.stdout + logs.stderr)
        docker_compose(builder, compose_file, "down", "-v", check=False)


@pytest.fixture(scope="module")
def compose_round(
    e2e_dir: Path,
    composed: Composed,
    builder: DockerDaemon,
    e2e_hub: FakeHubProcess,
    e2e_images: dict[str, SeededImage],
) -> Round:
    health = wait_healthy(builder, composed.container)
    assert health.get("Status") == "healthy", health
    with DockerDaemon(e2e_dir / "compose-puller", composed.url) as docker:
        e2e_hub.reset()
        pulls = pull_all(docker, e2e_images)
    shown = ", ".join(f"{name} {pull.seconds:.2f}s" for name, pull in pulls.items())
    print(f"\npulls through the compose file's mirror: {shown}")
    return Round(pulls, e2e_hub.stats())


@pytest.mark.skipif(shutil.which(COMPOSE) is None, reason=f"{COMPOSE} is not installed")
def test_compose_mirror_service_runs_the_image(
    composed: Composed, builder: DockerDaemon, compose_round: Round
) -> None:
    found = inspect(builder, "--type", "container", composed.container)
    assert found["State"]["Health"]["Status"] == "healthy"
    assert process_ids(int(found["State"]["Pid"])) == (USER_ID, USER_ID)
    assert found["HostConfig"]["ReadonlyRootfs"] is True
    # The project is named by deploy/.env: users' volumes keep their names.
    volumes = {m["Destination"]: m.get("Name") for m in found["Mounts"]}
    assert volumes["/var/lib/mirror"] == "mirror_mirror-data"
    assert "/etc/mirror/config.yaml" in volumes  # compose.config.yaml, named by MIRROR_CONFIG


@pytest.mark.skipif(shutil.which(COMPOSE) is None, reason=f"{COMPOSE} is not installed")
@pytest.mark.parametrize("name", IMAGES)
def test_pull_through_the_compose_mirror(
    name: str, compose_round: Round, e2e_images: dict[str, SeededImage]
) -> None:
    pull = compose_round.pulls[name]
    assert pull.returncode == 0, f"docker pull {name} failed:\n{pull.output}"
    assert pull.digest() == e2e_images[name].digest
