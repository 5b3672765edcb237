"""Which manifest a client gets for its Accept: what the distribution registry does.

The expectations were taken from docker-registry 2.8.2 (run here) and distribution v3's
GetManifest; where the mirror differs on purpose, the test says so (negotiation.py).
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mirror.oci import negotiation
from mirror.oci.errors import ManifestUnknown
from mirror.oci.negotiation import Verdict, decide, default_platform, parse_accept
from tests.fakehub import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, FakeHub

Client = TestClient[Any, Any]
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ALL = f"{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}"


@pytest.fixture
def content(hub: FakeHub) -> dict[str, Any]:
    """A schema 2 image, an OCI image, an OCI index and a Docker manifest list."""
    schema2 = hub.content.add_image("library/s2", "latest", [b"s2"])
    oci = hub.content.add_image("library/oci", "latest", [b"oci"], OCI_MANIFEST)
    amd64 = hub.content.add_image("library/list", None, [b"amd64"])
    arm64 = hub.content.add_image("library/list", None, [b"arm64"])
    entries = [
        {"mediaType": DOCKER_MANIFEST, "digest": image["digest"], "size": len(image["manifest"]),
         "platform": {"architecture": arch, "os": "linux"}}
        for image, arch in ((arm64, "arm64"), (amd64, "amd64"))
    ]  # fmt: skip
    body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries})
    docker_list = hub.content.add_manifest("library/list", body.encode(), DOCKER_LIST, "latest")
    index = hub.content.add_index(
        "library/index", "latest", [(oci["digest"], OCI_MANIFEST, len(oci["manifest"]), {})]
    )
    return {
        "s2": schema2["digest"],
        "oci": oci["digest"],
        "list": docker_list,
        "amd64": amd64["digest"],
        "index": index,
    }


async def answer(client: Client, repo: str, ref: str, accept: str | None) -> tuple[int, str]:
    """(status, digest served or error code) for a GET with this Accept."""
    resp = await client.get(
        f"/v2/library/{repo}/manifests/{ref}", headers={"Accept": accept} if accept else {}
    )
    if resp.status != 200:
        return resp.status, (await resp.json())["errors"][0]["code"]
    await resp.read()
    return 200, resp.headers["Docker-Content-Digest"]


# (repo, by, Accept) → expected; "amd64" is the list's linux/amd64 manifest.
CASES = [
    # OCI manifest and index: only when named; no Accept and */* name nothing.
    ("oci", "tag", None, 404), ("oci", "digest", "*/*", 404),
    ("oci", "tag", DOCKER_MANIFEST, 404), ("oci", "digest", OCI_MANIFEST, "oci"),
    ("index", "tag", None, 404), ("index", "digest", f"{DOCKER_LIST}, {OCI_MANIFEST}", 404),
    ("index", "tag", OCI_INDEX, "index"), ("index", "digest", "application/json", 404),
    # Docker manifest list: by digest always; by tag when named, else linux/amd64.
    ("list", "digest", None, "list"), ("list", "digest", OCI_MANIFEST, "list"),
    ("list", "tag", DOCKER_LIST, "list"), ("list", "tag", None, "amd64"),
    ("list", "tag", DOCKER_MANIFEST, "amd64"), ("list", "tag", "*/*", "amd64"),
    # Schema 2: when named or when no manifest type is named.
    ("s2", "tag", None, "s2"), ("s2", "digest", "*/*", "s2"), ("s2", "tag", DOCKER_MANIFEST, "s2"),
    # On purpose: an OCI-only client is refused Docker types (distribution: 200 or 400).
    ("s2", "tag", OCI_MANIFEST, 404), ("list", "tag", f"{OCI_MANIFEST}, {OCI_INDEX}", 404),
]  # fmt: skip


@pytest.mark.parametrize(("repo", "by", "accept", "expected"), CASES)
async def test_accept_negotiation(
    hub: FakeHub,
    client: Client,
    content: dict[str, Any],
    repo: str,
    by: str,
    accept: str | None,
    expected: str | int,
) -> None:
    ref = "latest" if by == "tag" else content[repo]

    status, got = await answer(client, repo, ref, accept)

    if isinstance(expected, int):
        assert (status, got) == (expected, "MANIFEST_UNKNOWN")
    else:
        assert (status, got) == (200, content[expected])


async def test_oci_refusal_says_why_as_distribution_does(
    client: Client, content: dict[str, Any]
) -> None:
    resp = await client.get("/v2/library/index/manifests/latest")

    error = (await resp.json())["errors"][0]
    assert error["message"] == "OCI index found, but accept header does not support OCI indexes"


async def test_upstream_asked_for_every_type_whatever_the_client(
    hub: FakeHub, client: Client, content: dict[str, Any]
) -> None:
    """A Docker-only client must not leave the tag resolved (or remembered missing)
    for the next client: the upstream is always offered every type."""
    refused = await answer(client, "index", "latest", f"{DOCKER_MANIFEST}, {DOCKER_LIST}")
    served = await answer(client, "index", "latest", ALL)

    assert refused == (404, "MANIFEST_UNKNOWN")
    assert served == (200, content["index"])
    assert all(
        set(seen) == {DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX}
        for seen in hub.stats.accept_seen
    )


async def test_list_fallback_head_carries_the_platform_manifest(
    client: Client, content: dict[str, Any]
) -> None:
    resp = await client.head("/v2/library/list/manifests/latest", headers={"Accept": "*/*"})

    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == content["amd64"]
    assert resp.headers["Content-Type"] == DOCKER_MANIFEST


def test_unknown_types_are_served() -> None:
    artifact = "application/vnd.oci.artifact.manifest.v1+json"
    assert decide(artifact, (), by_tag=True) is Verdict.SERVE


@pytest.mark.parametrize(
    "body", [b"[" * 100_000, b'{"manifests": ' + b"[" * 100_000, b'{"manifests": [[], "x"]}']
)
def test_a_list_that_names_no_platform_readably_has_no_default(body: bytes) -> None:
    with pytest.raises(ManifestUnknown):
        default_platform(body)


def test_accept_is_read_for_the_manifest_types_it_names() -> None:
    lines = (f"{DOCKER_MANIFEST};q=0.5, */*", f"text/html, {OCI_INDEX}", "application/json")

    assert parse_accept(lines) == (OCI_INDEX, DOCKER_MANIFEST)
    assert parse_accept((f" {OCI_MANIFEST} ; q=1 ,{OCI_MANIFEST}",)) == (OCI_MANIFEST,)
    assert parse_accept(()) == parse_accept(("*/*",)) == ()
    assert decide(OCI_INDEX, (DOCKER_MANIFEST, OCI_INDEX), by_tag=True) is Verdict.SERVE


def test_accept_values_past_the_cap_are_not_read() -> None:
    junk = ", ".join(["a/b"] * negotiation.MAX_ACCEPT_VALUES)

    assert parse_accept((f"{OCI_MANIFEST}, {junk}",)) == (OCI_MANIFEST,)
    assert parse_accept((junk, OCI_MANIFEST)) == ()
    assert parse_accept((f"{junk}, {OCI_MANIFEST}",)) == ()


def test_long_accept_lines_are_not_kept() -> None:
    """Nothing a client sends in Accept is kept but the few types it names: 40 requests
    of 120 lines of 8 KB each (unique) leave no more memory held than a few small ones."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(40):
            lines = (f"q{number}-{line}," + ",".join(["ab"] * 2600) for line in range(120))
            accept = parse_accept((*lines, DOCKER_MANIFEST))
            assert decide(DOCKER_MANIFEST, accept, by_tag=True) is Verdict.SERVE
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert held < 256 * 1024
