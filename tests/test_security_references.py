"""What a manifest names is no proof its repository holds it (cache/holdings.py).

A registry takes a manifest without checking every digest it names: a foreign or
non-distributable layer, a descriptor with `urls`, an index's children (distribution with
`validation.imageindexes.platforms: none`), a field of another manifest type. Anyone who
may push to some repository can so name a private digest the mirror has cached; the mirror
must still ask the upstream under that repository, and answer its 404.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mirror.cache.holdings import references
from tests.conftest import MakeClient
from tests.fakehub import DOCKER_MANIFEST, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, FakeHub
from tests.test_pull_policy import auth_with, basic, error, ghcr, htpasswd, policy_mirror
from tests.test_security_holdings import (
    MANIFEST_ACCEPT,
    RULES,
    Client,
    holdings_checks,
    pull,
    registry_requests,
)

__all__ = ["ghcr", "htpasswd"]  # fixtures shared with the pull-policy tests

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
URLS = ["https://example.com/layer.tar.gz"]


def naming(layer: str, how: str, config: str) -> tuple[str, dict[str, Any]]:
    """(media type, manifest) of a manifest that names `layer` in a way a registry takes
    without the blob being in the repository."""
    cfg = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2}
    named = {"digest": layer, "size": 16}
    image: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg}
    if how == "nondistributable":
        image["layers"] = [{**named, "mediaType": NONDISTRIBUTABLE, "urls": URLS}]
    elif how == "foreign":
        image.update(mediaType=DOCKER_MANIFEST, layers=[{**named, "mediaType": FOREIGN}])
    elif how == "urls":
        image["layers"] = [{**named, "mediaType": OCI_LAYER, "urls": URLS}]
    elif how == "blobs":  # the withdrawn artifact manifest's field, in an image manifest
        image.update(layers=[], blobs=[{**named, "mediaType": OCI_LAYER}])
    elif how == "index":  # an index checks its children only, never a `layers` field
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        return OCI_INDEX, {**index, "layers": [{**named, "mediaType": OCI_LAYER}]}
    return image["mediaType"], image


@pytest.mark.parametrize("how", ["nondistributable", "foreign", "urls", "blobs", "index"])
async def test_a_manifest_naming_a_private_layer_opens_nothing(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, htpasswd: Path, how: str
) -> None:
    hub.scoped_blobs = True
    secret = hub.content.add_image("private/secret", "v1", [b"the secret layer"])
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd, RULES))
    await pull(client, "private/secret", secret, **basic("alice"))
    layer = secret["layers"][0]
    # Pushed by anyone to a repository of their own: the registry never asked for the blob.
    config = hub.content.add_blob(b"{}", "library/evil")
    media_type, evil = naming(layer, how, config)
    hub.content.add_manifest("library/evil", json.dumps(evil).encode(), media_type, "v1")
    resp = await client.get("/v2/library/evil/manifests/v1", headers={"Accept": media_type})
    assert resp.status == 200, await resp.text()
    hub.stats.reset()

    for method in ("GET", "HEAD", "GET"):
        resp = await client.request(method, f"/v2/library/evil/blobs/{layer}")
        body = await resp.read()
        assert resp.status == 404, (method, body[:100])
        assert b"the secret layer" not in body
    assert error(body)["code"] == "BLOB_UNKNOWN"
    # The upstream was asked under library/evil, once; never under the private repository.
    assert registry_requests(hub) == [("HEAD", f"/v2/library/evil/blobs/{layer}")]
    assert hub.stats["cdn_get"] == 0
    # The config the registry did check is the repository's own: served with no question.
    resp = await client.get(f"/v2/library/evil/blobs/{config}")
    assert resp.status == 200 and await resp.read() == b"{}"
    assert len(registry_requests(hub)) == 2  # fetched, as it was not cached yet


@pytest.mark.parametrize("list_type", [OCI_INDEX, DOCKER_LIST])
async def test_an_index_naming_a_private_manifest_opens_nothing(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, htpasswd: Path, list_type: str
) -> None:
    hub.scoped_blobs = True
    secret = hub.content.add_image("private/secret", "v1", [b"the secret layer"])
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd, RULES))
    resp = await client.get(
        "/v2/private/secret/manifests/v1", headers={**basic("alice"), **MANIFEST_ACCEPT}
    )
    assert resp.status == 200
    platform = {"architecture": "amd64", "os": "linux"}
    child = {"mediaType": DOCKER_MANIFEST, "digest": secret["digest"], "size": 1}
    index = {
        "schemaVersion": 2,
        "mediaType": list_type,
        "manifests": [{**child, "platform": platform}],
    }
    hub.content.add_manifest("library/evil", json.dumps(index).encode(), list_type, "v1")
    resp = await client.get("/v2/library/evil/manifests/v1", headers={"Accept": list_type})
    assert resp.status == 200
    hub.stats.reset()

    # By digest, as a client reading the index asks next.
    resp = await client.get(
        f"/v2/library/evil/manifests/{secret['digest']}", headers=MANIFEST_ACCEPT
    )
    body = await resp.read()
    assert resp.status == 404 and error(body)["code"] == "MANIFEST_UNKNOWN"
    assert b"the secret layer" not in body and secret["manifest"] not in body
    # By tag, by a client that reads no lists: the list's linux/amd64 child (a Docker list).
    if list_type == DOCKER_LIST:
        resp = await client.get("/v2/library/evil/manifests/v1", headers=MANIFEST_ACCEPT)
        assert resp.status == 404 and error(await resp.read())["code"] == "MANIFEST_UNKNOWN"
    asked = registry_requests(hub)
    assert asked == [("HEAD", f"/v2/library/evil/manifests/{secret['digest']}")]  # then memory
    assert (await holdings_checks(client))[("manifest", "refused")] == (
        2 if list_type == DOCKER_LIST else 1
    )


async def test_an_index_child_pulled_through_another_repository_is_confirmed_once(
    hub: FakeHub, client: Client
) -> None:
    hub.scoped_blobs = True
    child = hub.content.add_image("library/one", "v1", [b"amd64 layer"], OCI_MANIFEST)
    platform = {"os": "linux", "architecture": "amd64"}
    entry = (child["digest"], OCI_MANIFEST, len(child["manifest"]), platform)
    # library/two holds the same image under an index (pushed there too).
    hub.content.add_manifest("library/two", child["manifest"], OCI_MANIFEST)
    for digest in [child["config"], *child["layers"]]:
        hub.content.blob_repos[digest].add("library/two")
    hub.content.add_index("library/two", "v1", [entry])
    accept = {"Accept": OCI_MANIFEST}
    resp = await client.get(f"/v2/library/one/manifests/{child['digest']}", headers=accept)
    assert resp.status == 200
    resp = await client.get("/v2/library/two/manifests/v1", headers={"Accept": OCI_INDEX})
    assert resp.status == 200
    hub.stats.reset()

    for _ in range(3):  # the first asks the upstream under library/two; the others, nobody
        resp = await client.get(f"/v2/library/two/manifests/{child['digest']}", headers=accept)
        assert resp.status == 200 and await resp.read() == child["manifest"]
    assert registry_requests(hub) == [("HEAD", f"/v2/library/two/manifests/{child['digest']}")]
    assert (await holdings_checks(client))[("manifest", "confirmed")] == 1
    # Its config and layers came through library/two's own manifest now: no more questions.
    hub.stats.reset()
    for digest in [child["config"], *child["layers"]]:
        assert (await client.get(f"/v2/library/two/blobs/{digest}")).status == 200
    assert [m for m, _ in registry_requests(hub) if m == "HEAD"] == []


def test_references_are_the_blobs_a_registry_checked() -> None:
    config, layer, other = ("sha256:" + c * 64 for c in "abc")
    image = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config},
        "layers": [
            {"mediaType": OCI_LAYER, "digest": layer},
            {"mediaType": NONDISTRIBUTABLE, "digest": other, "urls": URLS},
            {"mediaType": FOREIGN, "digest": other},
            {"mediaType": OCI_LAYER, "digest": other, "urls": []},
            "not a descriptor",
        ],
        "subject": {"mediaType": OCI_MANIFEST, "digest": other},
    }
    body = json.dumps(image).encode()
    assert references(body, OCI_MANIFEST) == [config, layer]
    assert references(body, OCI_INDEX) == []  # what the registry took it as decides
    nested = b'{"layers": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # RecursionError
    assert references(nested, OCI_MANIFEST) == []
    docker = json.dumps({**image, "mediaType": DOCKER_MANIFEST}).encode()
    assert references(docker, DOCKER_MANIFEST) == [config, layer]
    claims_index = json.dumps({**image, "mediaType": OCI_INDEX}).encode()
    assert references(claims_index, OCI_MANIFEST) == []
    with_children = json.dumps({**image, "manifests": [{"digest": other}]}).encode()
    assert references(with_children, OCI_MANIFEST) == []
    assert references(b"not json", OCI_MANIFEST) == []
    assert references(b"[]", OCI_MANIFEST) == []
