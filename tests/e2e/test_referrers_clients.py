"""Signing tools reading referrers through the mirror process, against a real registry.

    requests as cosign / notation / oras send them ─┐
    skopeo (the tag-schema index, the signature) ───┴─> mirror ─> fake hub ─> docker-registry

No `oras` CLI can be installed here: Debian packages only the oras-go library
(golang-oras-oras-go-dev), PyPI's `oras` is the Python SDK (it has no referrers call), and
npm has no oras CLI. So this module sends the exact requests of the Go libraries those
tools use, read from their sources:

- oras-go (`oras discover`, notation): a ping `GET /v2/<name>/referrers/sha256:0…0`, then
  `GET /v2/<name>/referrers/<digest>?artifactType=<type>` with no Accept; it needs 200 and
  a Content-Type of exactly `application/vnd.oci.image.index.v1+json`, else it falls back
  to the tag schema; it filters itself unless `OCI-Filters-Applied: artifactType` is set.
- go-containerregistry (cosign): `GET /v2/<name>/referrers/<digest>` with
  `Accept: application/vnd.oci.image.index.v1+json`, the same Content-Type check, and its
  own artifactType filter.

The registry (docker-registry 2.8, no referrers API) keeps the tag-schema index the test
pushes, as cosign and notation push it to registries without the API.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import images
from tests.services import DistributionRegistry, FakeHubProcess, MirrorProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("docker-registry") is None, reason="needs docker-registry on this machine"
    ),
]
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
NOTATION = "application/vnd.cncf.notary.signature"
COSIGN = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
ZERO = "sha256:" + "0" * 64
REPO = "library/signed"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The registry with a signed image, the fake hub before it, the mirror before that."""
    workdir = tmp_path_factory.mktemp("referrers-e2e")
    config_file = workdir / "mirror.yaml"
    config_file.write_text(json.dumps({"cache": {"tag_ttl": 0}}) + "\n")
    config = ["--config", str(config_file)]
    with DistributionRegistry(workdir / "registry") as registry:
        image = images.busybox_image()
        images.push_image(registry.url, REPO, "latest", image)
        artifacts = [(NOTATION, b"jws"), (COSIGN, b"sig"), (SBOM, b"{}")]
        index, manifests = images.push_referrers(registry.url, REPO, image.manifest, artifacts)
        with (
            FakeHubProcess(registry.url, workdir=workdir / "fakehub") as hub,
            # Tags (and so referrers) expire at once: every answer is revalidated, and
            # an outage shows whether the kept answer is served stale.
            MirrorProcess(workdir / "mirror", hub.registry_url, extra_args=config) as mirror,
        ):
            yield {
                "mirror": mirror,
                "hub": hub,
                "workdir": workdir,
                "subject": image.manifest.digest,
                "index": index,
                "artifacts": {kind: m for (kind, _), m in zip(artifacts, manifests, strict=True)},
            }


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=30)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}" if parts.query else parts.path,
                     headers=headers or {})  # fmt: skip
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def descriptors(body: bytes) -> dict[str, str]:
    return {m["artifactType"]: m["digest"] for m in json.loads(body)["manifests"]}


def set_knobs(hub: FakeHubProcess, **knobs: Any) -> None:
    req = urllib.request.Request(
        f"{hub.registry_url}/_knobs", data=json.dumps(knobs).encode(), method="POST"
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10):
        pass


def test_oras_go_ping_and_discover_with_artifact_type(stack: dict[str, Any]) -> None:
    """notation verify / oras discover --artifact-type: ping, then the filtered query."""
    base = f"{stack['mirror'].url}/v2/{REPO}/referrers"
    status, headers, body = get(f"{base}/{ZERO}")
    assert (status, headers["Content-Type"]) == (200, OCI_INDEX)  # the API is supported
    assert descriptors(body) == {}

    query = urllib.parse.urlencode({"artifactType": NOTATION})
    status, headers, body = get(f"{base}/{stack['subject']}?{query}")

    assert (status, headers["Content-Type"]) == (200, OCI_INDEX)
    assert headers["OCI-Filters-Applied"] == "artifactType"
    assert descriptors(body) == {NOTATION: stack["artifacts"][NOTATION].digest}


def test_go_containerregistry_referrers_as_cosign_asks(stack: dict[str, Any]) -> None:
    url = f"{stack['mirror'].url}/v2/{REPO}/referrers/{stack['subject']}"

    status, headers, body = get(url, {"Accept": OCI_INDEX})

    assert (status, headers["Content-Type"]) == (200, OCI_INDEX)
    assert descriptors(body) == {kind: m.digest for kind, m in stack["artifacts"].items()}
    assert body == stack["index"].data  # the tag-schema index, byte for byte


def test_signature_manifest_and_blob_fetched_by_digest(stack: dict[str, Any]) -> None:
    signature = stack["artifacts"][NOTATION]
    url = f"{stack['mirror'].url}/v2/{REPO}/manifests/{signature.digest}"
    status, headers, body = get(url, {"Accept": images.OCI_MANIFEST})
    assert status == 200
    assert headers["Docker-Content-Digest"] == signature.digest
    layer = json.loads(body)["layers"][0]["digest"]

    status, headers, blob = get(f"{stack['mirror'].url}/v2/{REPO}/blobs/{layer}")

    assert (status, blob) == (200, b"jws")
    assert headers["ETag"] == f'"{layer}"'


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo on this machine")
def test_skopeo_reads_the_tag_schema_index_and_the_signature(stack: dict[str, Any]) -> None:
    home = stack["workdir"] / "skopeo-home"
    (home / "run").mkdir(parents=True, exist_ok=True)
    (home / "registries.conf").write_text("")
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"),
           "CONTAINERS_REGISTRIES_CONF": str(home / "registries.conf"),
           "REGISTRY_AUTH_FILE": str(home / "auth.json")}  # fmt: skip
    host = stack["mirror"].url.removeprefix("http://")
    tag = stack["subject"].replace(":", "-")

    def skopeo(*args: str) -> str:
        done = subprocess.run(["skopeo", *args], env=env, capture_output=True, text=True,
                              timeout=120, check=False, stdin=subprocess.DEVNULL)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    raw_index = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{host}/{REPO}:{tag}")
    signature = stack["artifacts"][COSIGN].digest
    target = Path(stack["workdir"]) / "signature"
    skopeo("copy", "--src-tls-verify=false", f"docker://{host}/{REPO}@{signature}", f"dir:{target}")

    assert raw_index.encode() == stack["index"].data
    assert (target / "manifest.json").read_bytes() == stack["artifacts"][COSIGN].data


def test_referrers_answered_through_an_upstream_outage(stack: dict[str, Any]) -> None:
    """With the upstream down, the kept answer is served stale: verifying still works."""
    url = f"{stack['mirror'].url}/v2/{REPO}/referrers/{stack['subject']}"
    get(url, {"Accept": OCI_INDEX})
    set_knobs(stack["hub"], registry_status=503)
    try:
        status, headers, body = get(url, {"Accept": OCI_INDEX})
        signature = stack["artifacts"][NOTATION].digest
        sig_status, _, _ = get(
            f"{stack['mirror'].url}/v2/{REPO}/manifests/{signature}",
            {"Accept": images.OCI_MANIFEST},
        )
    finally:
        set_knobs(stack["hub"], registry_status=None)

    assert (status, headers["Content-Type"]) == (200, OCI_INDEX)
    assert headers["Warning"].startswith("110")
    assert body == stack["index"].data
    assert sig_status == 200
