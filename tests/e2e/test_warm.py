"""`mirror warm` fills the cache so that a following `docker pull` asks the upstream for
no blob at all.

    python -m mirror warm ──┐
                            ├─> fake hub process ──> docker-registry (busybox, multiarch, layers20)
    dockerd ──> mirror ─────┘   (its stats count every request)

The warm runs as its own process, before any mirror is serving; the mirror then starts on
the same storage, and a real Docker daemon pulls through it with the hub's counters zeroed.
Run with `python -m pytest tests/e2e/test_warm.py -q -s -m e2e`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.images import (
    SeededImage,
    _describe,
    busybox_image,
    host_arch,
    many_layers_image,
    multiarch_index,
    push_image,
)
from tests.services import (
    REPO_ROOT,
    DistributionRegistry,
    DockerDaemon,
    FakeHubProcess,
    MirrorProcess,
    _python_env,
    missing_tools,
)

MISSING = missing_tools()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(MISSING), reason=f"e2e needs {', '.join(MISSING)} on this machine"),
]
SUMMARY = re.compile(
    r"^warmed (\d+)/(\d+) images: (\d+) manifests, (\d+) blobs \((\d+) fetched, "
    r"(\d+) already cached\), .* fetched in [\d.]+s$",
    re.MULTILINE,
)
WARM_TIMEOUT = 300


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("warm")


@pytest.fixture(scope="module")
def warm_registry(warm_dir: Path) -> Iterator[DistributionRegistry]:
    with DistributionRegistry(warm_dir / "registry") as registry:
        yield registry


@pytest.fixture(scope="module")
def warm_images(warm_registry: DistributionRegistry) -> dict[str, SeededImage]:
    """The small test images (not the 256 MiB one) as library/<name>:latest."""
    images = {
        "busybox": busybox_image(),
        "multiarch": multiarch_index(),
        "layers20": many_layers_image(20),
    }
    seeded = {}
    for name, image in images.items():
        push_image(warm_registry.url, f"library/{name}", "latest", image)
        seeded[name] = _describe(f"library/{name}", "latest", image)
    return seeded


@pytest.fixture(scope="module")
def warm_hub(
    warm_dir: Path, warm_registry: DistributionRegistry, warm_images: dict[str, SeededImage]
) -> Iterator[FakeHubProcess]:
    with FakeHubProcess(warm_registry.url, workdir=warm_dir / "fakehub") as hub:
        yield hub


@dataclass
class Warmed:
    storage: Path
    runs: list[subprocess.CompletedProcess[str]]


def run_warm(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "mirror", "warm", *args],
        cwd=REPO_ROOT, env=_python_env(), capture_output=True, text=True,
        timeout=WARM_TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    print(f"\n$ mirror warm {' '.join(args)}  # exit {done.returncode}\n{done.stdout}{done.stderr}")
    return done


@pytest.fixture(scope="module")
def warmed(warm_dir: Path, warm_hub: FakeHubProcess) -> Warmed:
    """busybox and layers20 warmed whole; multiarch for this host's platform only."""
    storage = warm_dir / "mirror" / "data"  # where MirrorProcess(warm_dir / "mirror") caches
    common = ["--upstream", warm_hub.registry_url, "--storage", str(storage)]
    first = run_warm(*common, "library/busybox:latest", "library/layers20:latest")
    second = run_warm(*common, "--platform", f"linux/{host_arch()}", "library/multiarch")
    return Warmed(storage, [first, second])


def summary(done: subprocess.CompletedProcess[str]) -> tuple[int, ...]:
    match = SUMMARY.search(done.stdout)
    assert match, f"no summary line in:\n{done.stdout}\n{done.stderr}"
    return tuple(int(group) for group in match.groups())


def test_warm_exits_0_with_a_summary(warmed: Warmed, warm_images: dict[str, SeededImage]) -> None:
    first, second = warmed.runs
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Traceback" not in first.stderr
    busybox, layers20 = warm_images["busybox"], warm_images["layers20"]
    # busybox's layer is layers20's first: fetched once, then found in the cache.
    blobs = 1 + len(busybox.layers) + 1 + len(layers20.layers)
    assert summary(first) == (2, 2, 2, blobs, blobs - 1, 1)
    assert "library/busybox:latest: done" in first.stdout
    assert "library/layers20:latest: done" in first.stdout

    assert second.returncode == 0, second.stdout + second.stderr
    multiarch = warm_images["multiarch"]
    images, named, manifests, total, _, _ = summary(second)
    assert (images, named, manifests) == (1, 1, 2)  # the index and this platform's manifest
    assert total == 1 + len(multiarch.layers)


def test_docker_pull_after_warm_asks_upstream_for_no_blob(
    warm_dir: Path,
    warmed: Warmed,
    warm_hub: FakeHubProcess,
    warm_images: dict[str, SeededImage],
) -> None:
    assert all(done.returncode == 0 for done in warmed.runs), "the warm failed"
    with (
        MirrorProcess(warm_dir / "mirror", warm_hub.registry_url) as mirror,
        DockerDaemon(warm_dir / "docker", mirror.url) as docker,
    ):
        assert (warm_dir / "mirror" / "data") == warmed.storage
        warm_hub.reset()
        pulled = {}
        for name in ("busybox", "layers20", "multiarch"):
            done = docker.docker("pull", name, check=False, timeout=300)
            print(f"\n$ docker pull {name}  # exit {done.returncode}\n{done.stdout}{done.stderr}")
            pulled[name] = done
        stats = warm_hub.stats()
        ran = docker.docker("run", "--rm", "--network", "none", "layers20", "cat",
                            "/layers/19.txt", check=False)  # fmt: skip

    for name, done in pulled.items():
        assert done.returncode == 0, f"docker pull {name} failed:\n{done.stdout}{done.stderr}"
        assert f"Digest: {warm_images[name].digest}" in done.stdout
    counters = {key: value for key, value in stats.items() if isinstance(value, int)}
    print(f"\nfake hub requests during the pulls: {counters}")
    assert (stats["blob_get"], stats["cdn_get"]) == (0, 0), f"upstream requests: {counters}"
    assert stats["blob_head"] == stats["cdn_head"] == 0, counters
    # The warm's tags came across in storage/metadata.json: not even a manifest was asked.
    assert stats["manifest_get"] == stats["manifest_head"] == 0, counters
    assert ran.stdout == "layer 19 of 20\n", ran.stderr
