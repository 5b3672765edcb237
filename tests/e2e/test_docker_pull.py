"""A real Docker daemon pulls real images through the mirror, cold and then warm.

Docker Hub is unreachable here, so a pull that succeeds was served by the mirror: the
daemon only falls back to the Hub itself when its mirror fails. Run with
`python -m pytest tests/e2e -q -s -m e2e` to see the timings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.images import SeededImage
from tests.services import DockerDaemon, missing_tools

if TYPE_CHECKING:
    from tests.e2e.conftest import Round

MISSING = missing_tools()
IMAGES = ["busybox", "multiarch", "layers20", "large"]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(MISSING), reason=f"e2e needs {', '.join(MISSING)} on this machine"),
]


def blob_digests(images: dict[str, SeededImage]) -> set[str]:
    """Every blob Docker downloads on this host: each image's config and layers."""
    digests = set()
    for image in images.values():
        digests.add(image.config)
        digests.update(digest for digest, _ in image.layers)
    return digests


@pytest.mark.parametrize("name", IMAGES)
def test_cold_pull(name: str, cold_round: Round, e2e_images: dict[str, SeededImage]) -> None:
    pull = cold_round.pulls[name]
    assert pull.returncode == 0, f"docker pull {name} failed:\n{pull.output}"
    assert pull.digest() == e2e_images[name].digest


def test_run_pulled_busybox(cold_round: Round, e2e_docker: DockerDaemon) -> None:
    assert cold_round.pulls["busybox"].returncode == 0, "busybox was not pulled"
    done = e2e_docker.docker("run", "--rm", "--network", "none", "busybox", "echo", "hello")
    assert done.stdout == "hello\n"


def test_cold_round_fetches_each_blob_once(
    cold_round: Round, e2e_images: dict[str, SeededImage]
) -> None:
    stats = cold_round.stats
    by_digest = stats["cdn_get_by_digest"]
    assert isinstance(by_digest, dict)
    missing = blob_digests(e2e_images) - set(by_digest)
    assert not missing, f"never fetched from the CDN: {sorted(missing)}"
    repeated = {digest: n for digest, n in by_digest.items() if n != 1}
    assert not repeated, f"fetched from the CDN more than once: {repeated}"
    assert stats["cdn_rejected_auth"] == 0, "the mirror sent its token to the CDN"


@pytest.mark.parametrize("name", IMAGES)
def test_warm_pull(name: str, warm_round: Round, e2e_images: dict[str, SeededImage]) -> None:
    pull = warm_round.pulls[name]
    assert pull.returncode == 0, f"docker pull {name} failed:\n{pull.output}"
    assert pull.digest() == e2e_images[name].digest


def test_warm_round_fetches_no_blob(warm_round: Round) -> None:
    stats = warm_round.stats
    counters = {key: value for key, value in stats.items() if isinstance(value, int)}
    assert (stats["blob_get"], stats["cdn_get"]) == (0, 0), f"upstream requests: {counters}"
