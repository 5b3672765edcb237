"""Bytes one upstream sent are never another upstream's to serve (cache/holdings.py).

The cache is by digest across every upstream. An upstream that names a digest (in a
manifest, a tag, a 200 to a HEAD) it learnt of must not get the mirror to hand its
clients what another upstream sent: a digest counts as held under an upstream only once
that upstream sent the bytes itself, checked against the digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror.config import CacheConfig, Config, StorageConfig, UpstreamConfig
from mirror.web.app import create_app
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.test_pull_policy import error
from tests.test_security_holdings import pull, registry_requests

Client = TestClient[Any, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OCI = "application/vnd.oci.image.manifest.v1+json"
SECRET = b"private layer bytes of upstream B"


def dig(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def naming(digest: str, size: int) -> bytes:
    """An image manifest whose config is `digest`."""
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest}
    return json.dumps({"schemaVersion": 2, "mediaType": OCI, "config": {**config, "size": size},
                       "layers": []}).encode()  # fmt: skip


class Registry:
    """A small upstream: blobs and manifests by path, every request noted."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}  # path → bytes
        self.manifests: dict[str, bytes] = {}  # path → body
        self.heads: dict[str, str] = {}  # manifest path → the digest a HEAD claims
        self.seen: list[tuple[str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path))
        path = request.path
        if path in self.blobs:
            return web.Response(body=self.blobs[path])
        if request.method == "HEAD" and path in self.heads:
            headers = {"Content-Type": OCI, "Docker-Content-Digest": self.heads[path]}
            return web.Response(headers={**headers, "Content-Length": "100"})
        if path in self.manifests:
            body = self.manifests[path]
            headers = {"Content-Type": OCI, "Docker-Content-Digest": dig(body)}
            return web.Response(body=body, headers=headers)
        code = "MANIFEST_UNKNOWN" if "/manifests/" in path else "BLOB_UNKNOWN"
        return web.json_response({"errors": [{"code": code, "message": "unknown"}]}, status=404)


async def base(_: web.Request) -> web.Response:
    return web.json_response({})


async def two_upstreams(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> tuple[Client, Registry, Registry]:
    """A mirror of a.test (the default) and b.test; B holds SECRET under secret/app."""
    registries = (Registry(), Registry())
    urls = []
    for registry in registries:
        app = web.Application()
        app.router.add_get("/v2/", base)
        app.router.add_route("*", "/v2/{rest:.+}", registry.handle)
        urls.append(f"http://127.0.0.1:{(await aiohttp_server(app)).port}")
    a, b = registries
    b.blobs[f"/v2/secret/app/blobs/{dig(SECRET)}"] = SECRET
    config = Config(
        host="127.0.0.1",
        port=0,
        upstream=UpstreamConfig(url=urls[0], name="a.test", connect_timeout=2, read_timeout=5),
        upstreams=(UpstreamConfig(url=urls[1], name="b.test", connect_timeout=2, read_timeout=5),),
        storage=StorageConfig(path=tmp_path / "data"),
        cache=CacheConfig(tag_ttl=600),
    )
    client = await aiohttp_client(create_app(config))
    resp = await client.get(f"/v2/b.test/secret/app/blobs/{dig(SECRET)}")
    assert resp.status == 200 and await resp.read() == SECRET  # now in the cache
    return client, a, b


async def test_a_manifest_of_one_upstream_opens_nothing_another_sent(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    client, a, b = await two_upstreams(aiohttp_client, aiohttp_server, tmp_path)
    secret = dig(SECRET)
    a.manifests["/v2/evil/x/manifests/v1"] = naming(secret, len(SECRET))
    # A HEAD of any blob: "yes" (it learnt the digest; it never had the bytes).
    a.heads[f"/v2/evil/x/blobs/{secret}"] = secret
    resp = await client.get("/v2/a.test/evil/x/manifests/v1", headers={"Accept": OCI})
    assert resp.status == 200
    a.seen.clear()
    b.seen.clear()

    for _ in range(2):
        resp = await client.get(f"/v2/a.test/evil/x/blobs/{secret}")
        body = await resp.read()
        assert resp.status == 404 and error(body)["code"] == "BLOB_UNKNOWN", body
        assert SECRET not in body
    # A was asked for the bytes under its repository, once (its 404 remembered); B never.
    assert a.seen == [("GET", f"/v2/evil/x/blobs/{secret}")]
    assert b.seen == []


async def test_an_upstream_sending_other_bytes_is_not_believed(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    client, a, _ = await two_upstreams(aiohttp_client, aiohttp_server, tmp_path)
    secret = dig(SECRET)
    a.manifests["/v2/evil/x/manifests/v1"] = naming(secret, len(SECRET))
    a.blobs[f"/v2/evil/x/blobs/{secret}"] = b"anything but the secret"
    resp = await client.get("/v2/a.test/evil/x/manifests/v1", headers={"Accept": OCI})
    assert resp.status == 200
    resp = await client.get(f"/v2/a.test/evil/x/blobs/{secret}")
    body = await resp.read()
    assert resp.status == 502 and error(body)["code"] == "DIGEST_INVALID", body
    assert SECRET not in body


async def test_a_digest_both_upstreams_hold_is_served_once_the_other_sent_it(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    client, a, b = await two_upstreams(aiohttp_client, aiohttp_server, tmp_path)
    shared = dig(SECRET)  # public after all: A holds the same bytes
    a.blobs[f"/v2/team/app/blobs/{shared}"] = SECRET
    a.manifests["/v2/team/app/manifests/v1"] = naming(shared, len(SECRET))
    resp = await client.get("/v2/a.test/team/app/manifests/v1", headers={"Accept": OCI})
    assert resp.status == 200
    a.seen.clear()
    for _ in range(3):  # the first has A send the bytes; then the cache answers
        resp = await client.get(f"/v2/a.test/team/app/blobs/{shared}")
        assert resp.status == 200 and await resp.read() == SECRET
    assert a.seen == [("GET", f"/v2/team/app/blobs/{shared}")]
    assert b.seen == [("GET", f"/v2/secret/app/blobs/{shared}")]  # the first fill, alone


async def test_a_tag_or_index_of_one_upstream_opens_no_manifest_another_sent(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    client, a, b = await two_upstreams(aiohttp_client, aiohttp_server, tmp_path)
    private = naming(dig(SECRET), len(SECRET))
    b.manifests["/v2/secret/app/manifests/v1"] = private
    resp = await client.get("/v2/b.test/secret/app/manifests/v1", headers={"Accept": OCI})
    assert resp.status == 200 and await resp.read() == private
    # A says its tag is B's private manifest (a HEAD costs it nothing; it has no bytes).
    a.heads["/v2/evil/x/manifests/v1"] = dig(private)
    a.seen.clear()

    resp = await client.head("/v2/a.test/evil/x/manifests/v1", headers={"Accept": OCI})
    assert resp.status == 200  # what A says, and no more
    for path in (f"/v2/a.test/evil/x/manifests/{dig(private)}", "/v2/a.test/evil/x/manifests/v1"):
        resp = await client.get(path, headers={"Accept": OCI})
        body = await resp.read()
        assert resp.status == 404 and error(body)["code"] == "MANIFEST_UNKNOWN", (path, body)
        assert body != private
    assert ("GET", f"/v2/evil/x/manifests/{dig(private)}") in a.seen


async def test_a_single_upstream_cache_from_before_the_records_serves_on(
    hub: FakeHub, config: Config, make_client: MakeClient
) -> None:
    hub.scoped_blobs = True
    image = hub.content.add_image("library/app", "v1", [b"app layer"])
    first = await make_client()
    await pull(first, "library/app", image)
    await first.close()  # the snapshot written
    # What an older mirror left: holdings, and no record of which upstream sent what.
    snapshot = config.storage.path / "metadata.json"
    data = json.loads(snapshot.read_text())
    sent = [h for h in data["holdings"] if h["repo"] == "_sent"]
    assert len(sent) == 1 and len(sent[0]["digests"]) == 3  # the manifest, config, layer
    data["holdings"] = [h for h in data["holdings"] if h["repo"] != "_sent"]
    snapshot.write_text(json.dumps(data))
    client = await make_client()
    hub.stats.reset()
    await pull(client, "library/app", image)
    assert registry_requests(hub) == []
