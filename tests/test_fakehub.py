"""The fake Docker Hub behaves like the facts in registry-facts.md say the real one does."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import ClientSession

from tests.fakehub import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, FakeHub

LAYER = bytes(range(256)) * 1000  # 256 000 bytes: several 64 KiB CDN chunks


@pytest.fixture
async def hub() -> AsyncIterator[FakeHub]:
    async with FakeHub() as hub:
        yield hub


@pytest.fixture
async def session() -> AsyncIterator[ClientSession]:
    async with ClientSession(auto_decompress=False) as session:
        yield session


def parse_challenge(header: str) -> dict[str, str]:
    scheme, _, params = header.partition(" ")
    assert scheme == "Bearer"
    return dict(re.findall(r'(\w+)="([^"]*)"', params))


async def token_for(session: ClientSession, hub: FakeHub, repo: str) -> dict[str, str]:
    params = {"service": "registry.docker.io", "scope": f"repository:{repo}:pull"}
    async with session.get(f"{hub.token_url}/token", params=params) as resp:
        assert resp.status == 200
        token = (await resp.json())["token"]
    return {"Authorization": f"Bearer {token}"}


async def test_challenge_token_retry(hub: FakeHub, session: ClientSession) -> None:
    image = hub.content.add_image("library/nginx", "latest", [LAYER])
    url = f"{hub.registry_url}/v2/library/nginx/manifests/latest"
    async with session.get(url, headers={"Accept": DOCKER_MANIFEST}) as resp:
        assert resp.status == 401
        assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
        challenge = parse_challenge(resp.headers["WWW-Authenticate"])
    assert challenge == {
        "realm": f"{hub.token_url}/token",
        "service": "registry.docker.io",
        "scope": "repository:library/nginx:pull",
    }
    params = {"service": challenge["service"], "scope": challenge["scope"]}
    async with session.get(challenge["realm"], params=params) as resp:
        body = await resp.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    auth = {"Authorization": f"Bearer {body['token']}"}

    async with session.get(url, headers={**auth, "Accept": DOCKER_MANIFEST}) as resp:
        assert resp.status == 200
        assert await resp.read() == image["manifest"]
        assert resp.headers["Docker-Content-Digest"] == image["digest"]
        assert resp.headers["ETag"] == f'"{image["digest"]}"'
        assert resp.headers["ratelimit-remaining"] == "99;w=21600"
    async with session.head(url, headers={**auth, "Accept": DOCKER_MANIFEST}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(image["manifest"]))
        assert resp.headers["ratelimit-remaining"] == "99;w=21600"  # a HEAD is free
        assert await resp.read() == b""
    # The token covers library/nginx only; /v2/ takes any valid token.
    other = f"{hub.registry_url}/v2/library/redis/manifests/latest"
    async with session.get(other, headers=auth) as resp:
        assert resp.status == 401
    async with session.get(f"{hub.registry_url}/v2/", headers=auth) as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    stats = hub.stats
    assert (stats["unauthorized"], stats["token"], stats["v2"]) == (2, 1, 1)
    assert (stats["manifest_get"], stats["manifest_head"]) == (1, 1)


async def test_expired_token_and_basic_auth(hub: FakeHub, session: ClientSession) -> None:
    hub.token_expires_in = 0
    auth = await token_for(session, hub, "library/nginx")
    async with session.get(f"{hub.registry_url}/v2/", headers=auth) as resp:
        assert resp.status == 401
    hub.users = {"alice": "secret"}
    url = f"{hub.token_url}/token?service=registry.docker.io"
    async with session.get(url, headers={"Authorization": "Basic YWxpY2U6d3Jvbmc="}) as resp:
        assert resp.status == 401  # alice:wrong
    async with session.get(url, headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"}) as resp:
        assert resp.status == 200  # alice:secret
    assert hub.stats["token_basic"] == 2 and hub.stats.token_users == ["alice", "alice"]
    assert "secret" not in json.dumps(hub.stats.snapshot())


async def test_blob_redirects_to_cdn_which_rejects_auth(
    hub: FakeHub, session: ClientSession
) -> None:
    image = hub.content.add_image("library/nginx", "latest", [LAYER])
    digest = image["layers"][0]
    auth = await token_for(session, hub, "library/nginx")
    url = f"{hub.registry_url}/v2/library/nginx/blobs/{digest}"
    async with session.get(url, headers=auth, allow_redirects=False) as resp:
        assert resp.status == 307
        location = resp.headers["Location"]
    assert location.startswith(f"{hub.cdn_url}/blobs/{digest}?")
    async with session.get(location, headers=auth) as resp:
        assert resp.status == 400
    async with session.get(location) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert await resp.read() == LAYER
    missing = "sha256:" + "0" * 64
    async with session.get(url.replace(digest, missing), headers=auth) as resp:
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert hub.stats["cdn_rejected_auth"] == 1 and hub.stats.cdn_get_by_digest[digest] == 2


async def test_cdn_range(hub: FakeHub, session: ClientSession) -> None:
    digest = hub.content.add_blob(LAYER)
    url = f"{hub.cdn_url}/blobs/{digest}"
    async with session.get(url, headers={"Range": "bytes=100-199"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-199/{len(LAYER)}"
        assert await resp.read() == LAYER[100:200]
    async with session.get(url, headers={"Range": "bytes=70000-"}) as resp:
        assert resp.status == 206
        assert await resp.read() == LAYER[70000:]
    async with session.get(url, headers={"Range": f"bytes={len(LAYER)}-"}) as resp:
        assert resp.status == 416
        assert resp.headers["Content-Range"] == f"bytes */{len(LAYER)}"


async def test_cdn_knobs_corrupt_and_cut(hub: FakeHub, session: ClientSession) -> None:
    digest = hub.content.add_blob(LAYER)
    url = f"{hub.cdn_url}/blobs/{digest}"
    async with session.post(f"{hub.registry_url}/_knobs", json={"corrupt_blobs": [digest]}):
        pass
    async with session.get(url) as resp:
        body = await resp.read()
    assert len(body) == len(LAYER) and body != LAYER
    hub.corrupt_blobs.clear()
    hub.cdn_cut_after = 100_000
    async with session.get(url) as resp:
        assert resp.headers["Content-Length"] == str(len(LAYER))
        with pytest.raises(Exception):  # noqa: B017 - aiohttp's payload error class varies
            await resp.read()


async def test_accept_mismatch_is_unknown(hub: FakeHub, session: ClientSession) -> None:
    image = hub.content.add_image("library/nginx", "oci", [LAYER], media_type=OCI_MANIFEST)
    platform = {"architecture": "amd64", "os": "linux"}
    entry = (image["digest"], OCI_MANIFEST, len(image["manifest"]), platform)
    hub.content.add_index("library/nginx", "latest", [entry])
    auth = await token_for(session, hub, "library/nginx")
    url = f"{hub.registry_url}/v2/library/nginx/manifests/latest"
    async with session.get(url, headers={**auth, "Accept": DOCKER_MANIFEST}) as resp:
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # Accept spread over several header lines, with parameters, as Go clients send it.
    headers = [*auth.items(), ("Accept", DOCKER_MANIFEST), ("Accept", f"{OCI_INDEX};q=0.9")]
    async with session.get(url, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == OCI_INDEX
    assert hub.stats.accept_seen[-1] == [DOCKER_MANIFEST, OCI_INDEX]


async def test_tags_pagination(hub: FakeHub, session: ClientSession) -> None:
    image = hub.content.add_image("library/nginx", None, [LAYER])
    for tag in ("c", "a", "e", "b", "d"):
        hub.content.set_tag("library/nginx", tag, image["digest"])
    auth = await token_for(session, hub, "library/nginx")
    path, seen = "/v2/library/nginx/tags/list?n=2", []
    while path:
        async with session.get(hub.registry_url + path, headers=auth) as resp:
            seen.append((await resp.json())["tags"])
            link = resp.headers.get("Link", "")
        path = link[1 : link.index(">")] if link else ""
    assert seen == [["a", "b"], ["c", "d"], ["e"]]
    async with session.get(f"{hub.registry_url}/v2/library/nope/tags/list", headers=auth) as resp:
        assert resp.status == 401  # not in the token's scope
    auth = await token_for(session, hub, "library/nope")
    async with session.get(f"{hub.registry_url}/v2/library/nope/tags/list", headers=auth) as resp:
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "NAME_UNKNOWN"


async def test_ratelimit_and_stats_endpoints(hub: FakeHub, session: ClientSession) -> None:
    hub.content.add_image("library/nginx", "latest", [LAYER])
    auth = await token_for(session, hub, "library/nginx")
    url = f"{hub.registry_url}/v2/library/nginx/manifests/latest"
    async with session.post(f"{hub.registry_url}/_knobs", json={"ratelimit_remaining": 1}):
        pass
    async with session.get(url, headers=auth) as resp:
        assert resp.status == 200 and resp.headers["ratelimit-remaining"] == "0;w=21600"
    async with session.get(url, headers=auth) as resp:
        assert resp.status == 429 and "Retry-After" in resp.headers
    async with session.get(f"{hub.registry_url}/_stats") as resp:
        stats = await resp.json()
    assert stats["manifest_get"] == 2 and ["token", "GET"] == stats["requests"][0][:2]
    async with session.post(f"{hub.registry_url}/_reset"):
        pass
    assert hub.stats["manifest_get"] == 0 and hub.stats.requests == []


# --- backend mode, against a real CNCF distribution registry -------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    if not Path(binary).exists():
        pytest.skip("docker-registry is not installed")
    port = free_port()
    config = tmp_path / "config.yml"
    config.write_text(
        f"version: 0.1\nlog: {{level: error}}\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'data'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    proc = subprocess.Popen(
        [binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def wait_ready(session: ClientSession, url: str) -> None:
    for _ in range(100):
        try:
            async with session.get(f"{url}/v2/") as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(url)


async def push_blob(session: ClientSession, registry: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with session.post(f"{registry}/v2/{repo}/blobs/uploads/") as resp:
        assert resp.status == 202
        location = resp.headers["Location"]
    if location.startswith("/"):
        location = registry + location
    async with session.put(f"{location}&digest={digest}", data=data) as resp:
        assert resp.status == 201, await resp.text()
    return digest


async def test_backend_mode(registry: str, session: ClientSession) -> None:
    await wait_ready(session, registry)
    repo = "library/busybox"
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    descriptors = []
    for media_type, data in (
        ("application/vnd.docker.container.image.v1+json", config),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", LAYER),
    ):
        digest = await push_blob(session, registry, repo, data)
        descriptors.append({"mediaType": media_type, "size": len(data), "digest": digest})
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": descriptors[0],
         "layers": descriptors[1:]}
    ).encode()  # fmt: skip
    headers = {"Content-Type": DOCKER_MANIFEST}
    url = f"{registry}/v2/{repo}/manifests/latest"
    async with session.put(url, data=manifest, headers=headers) as resp:
        assert resp.status == 201, await resp.text()

    async with FakeHub(backend=registry) as hub:
        auth = await token_for(session, hub, repo)
        url = f"{hub.registry_url}/v2/{repo}/manifests/latest"
        async with session.get(url, headers={**auth, "Accept": DOCKER_MANIFEST}) as resp:
            assert resp.status == 200
            assert await resp.read() == manifest
            assert resp.headers["Docker-Content-Digest"].startswith("sha256:")
            assert resp.headers["ratelimit-remaining"] == "99;w=21600"
        async with session.head(url, headers={**auth, "Accept": DOCKER_MANIFEST}) as resp:
            assert resp.headers["Content-Length"] == str(len(manifest))
        blob_url = f"{hub.registry_url}/v2/{repo}/blobs/{descriptors[1]['digest']}"
        async with session.get(blob_url, headers=auth, allow_redirects=False) as resp:
            assert resp.status == 307
            location = resp.headers["Location"]
        async with session.get(location) as resp:
            assert await resp.read() == LAYER
        async with session.get(location, headers={"Range": "bytes=65536-65600"}) as resp:
            assert resp.status == 206 and await resp.read() == LAYER[65536:65601]
        async with session.get(f"{hub.registry_url}/v2/{repo}/tags/list", headers=auth) as resp:
            assert (await resp.json())["tags"] == ["latest"]
        missing = f"{hub.registry_url}/v2/{repo}/blobs/sha256:{'0' * 64}"
        async with session.get(missing, headers=auth, allow_redirects=False) as resp:
            assert resp.status == 404
