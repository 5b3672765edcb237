"""Cached content is no side door around the pull policy (cache/holdings.py).

Blobs and manifests are stored by digest, shared by every repository. Once a user allowed
to pull a private repository has pulled it, anyone who knows a digest must still get only
what the upstream would give them under the repository they name: a 404, with no upstream
request under the private repository and at most one HEAD under theirs.

The fake hub runs with `scoped_blobs`: a blob is found only in the repositories it was
pushed to, as on Docker Hub.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from prometheus_client import generate_latest

from mirror import commands
from mirror.config import Config, RedisConfig
from mirror.metadata.fallback import open_metadata
from mirror.metadata.store import KEY_PREFIX
from mirror.web import catalog as catalog_module
from mirror.web.keys import holdings_key, metadata_key, metrics_key, upstreams_key
from tests.conftest import MakeClient
from tests.fakehub import OCI_INDEX, OCI_MANIFEST, FakeHub
from tests.services import RedisServer
from tests.test_pull_policy import auth_with, basic, error, ghcr, htpasswd, policy_mirror

__all__ = ["ghcr", "htpasswd"]  # fixtures shared with the pull-policy tests

Client = TestClient[Any, Any]
# alice alone may pull private/**; everyone, logged in or not, library/**.
RULES = [
    {"who": ["alice"], "pull": ["docker.io/private/**"]},
    {"who": ["*", "anonymous"], "pull": ["docker.io/library/**"]},
]
MANIFEST_ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}


def registry_requests(hub: FakeHub) -> list[tuple[str, str]]:
    """(method, path) of what reached the hub's registry (tokens and the CDN aside)."""
    return [(method, path) for app, method, path in hub.stats.requests if app == "registry"]


async def holdings_checks(client: Client) -> dict[tuple[str, str], float]:
    """The counts the monitoring listener serves (a client listener's /metrics has none)."""
    text = generate_latest(client.app[metrics_key].exposed).decode()
    found = re.findall(
        r'^mirror_holdings_checks_total\{kind="(\w+)",result="(\w+)"\} (\S+)$', text, re.M
    )
    return {(kind, result): float(value) for kind, result, value in found}


async def pull(client: Client, repo: str, image: dict[str, Any], **headers: str) -> None:
    """What a client does: the manifest by tag, then the config and every layer."""
    resp = await client.get(f"/v2/{repo}/manifests/v1", headers={**MANIFEST_ACCEPT, **headers})
    assert resp.status == 200, await resp.text()
    await resp.read()
    for digest in [image["config"], *image["layers"]]:
        resp = await client.get(f"/v2/{repo}/blobs/{digest}", headers=headers)
        assert resp.status == 200, await resp.text()
        await resp.read()


async def cached_files(config: Config) -> set[Path]:
    """The storage's files once the downloads under way are renamed into place."""
    for _ in range(100):
        files = {path for path in config.storage.path.rglob("*") if path.is_file()}
        if not [path for path in files if path.parent.name == "tmp"]:
            return files
        await asyncio.sleep(0.05)  # a client has its last byte before the file's rename
    raise AssertionError(f"downloads never settled: {sorted(files)}")


def shape(headers: Any) -> dict[str, str]:
    """A miss's headers, less those that differ on every answer."""
    return {k: v for k, v in headers.items() if k not in ("Date", "X-Request-ID")}


async def test_a_digest_pulled_through_a_private_repository_opens_nothing_elsewhere(
    make_client: MakeClient,
    hub: FakeHub,
    ghcr: FakeHub,
    htpasswd: Path,
    config: Config,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub.scoped_blobs = True
    secret = hub.content.add_image("private/secret", "v1", [b"the secret layer"])
    hub.content.add_image("library/alpine", "v1", [b"alpine layer"])
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd, RULES))
    await pull(client, "private/secret", secret, **basic("alice"))
    # What a real miss looks like, for a digest nobody ever pulled.
    never = "sha256:" + "0" * 64
    real_misses = {}
    for repo in ("library/alpine", "library/doesnotexist"):
        for kind in ("blobs", "manifests"):
            resp = await client.get(f"/v2/{repo}/{kind}/{never}")
            real_misses[repo, kind] = (resp.status, shape(resp.headers), await resp.read())
    hub.stats.reset()
    files = await cached_files(config)
    caplog.clear()

    # The attack: bob, then an anonymous client, name the secret digests elsewhere.
    for who in (basic("bob"), {}):
        for repo in ("library/alpine", "library/doesnotexist"):
            for kind, digest in (
                ("blobs", secret["layers"][0]),
                ("blobs", secret["config"]),
                ("manifests", secret["digest"]),
            ):
                for method in ("GET", "HEAD"):
                    resp = await client.request(method, f"/v2/{repo}/{kind}/{digest}", headers=who)
                    body = await resp.read()
                    assert resp.status == 404, (method, repo, kind, body)
                    if method == "HEAD":
                        continue
                    code = "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN"
                    assert error(body)["code"] == code
                    assert b"the secret layer" not in body
                    status, headers, miss = real_misses[repo, kind]
                    assert (resp.status, shape(resp.headers)) == (status, headers)
                    assert error(body)["message"] == error(miss)["message"].replace(never, digest)

    asked = registry_requests(hub)
    assert not [path for _, path in asked if "private/secret" in path]
    assert {method for method, _ in asked} == {"HEAD"}, asked  # never a GET: no pull spent
    assert len(set(asked)) == 6, asked  # one HEAD per (repository, digest), then memory
    assert len(asked) - hub.stats["unauthorized"] == 6, asked  # (a 401 is answered once)
    assert hub.stats["cdn_get"] == 0
    assert await cached_files(config) - {config.storage.path / "metadata.json"} == files
    checks = await holdings_checks(client)
    assert (checks[("blob", "refused")], checks[("manifest", "refused")]) == (16, 8)
    holdings = client.app[holdings_key]
    upstream = client.app[upstreams_key].default.name
    assert not await holdings.known(upstream, "library/alpine", secret["layers"][0])
    assert "private/secret" not in caplog.text and "the secret layer" not in caplog.text
    # alice still pulls what she may.
    await pull(client, "private/secret", secret, **basic("alice"))


async def client_counts(client: Client) -> dict[str, float]:
    """Every counter a client reads on /metrics. Not the times (timing is no promise), nor
    the gauges: an upstream's pulls left is the upstream's word on every GET it counts."""
    text = await (await client.get("/metrics")).text()
    found = re.findall(r"^(mirror_\w+_total(?:\{[^}]*\})?) (\S+)$", text, re.M)
    return {name: float(value) for name, value in found}


async def test_a_digest_cached_for_another_repository_looks_never_pulled_on_metrics(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, htpasswd: Path, config: Config
) -> None:
    """A client's /metrics is no oracle for what others pulled: a digest alice pulled
    through private/secret, asked for under library/alpine, changes the counts a digest
    never pulled changes (a cache miss, then the upstream's 404, asked or remembered).
    How many such requests the holdings refused is the operator's, on metrics.listen."""
    hub.scoped_blobs = True
    secret = hub.content.add_image("private/secret", "v1", [b"the secret layer"])
    alpine = hub.content.add_image("library/alpine", "v1", [b"alpine layer"])
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd, RULES))
    await pull(client, "private/secret", secret, **basic("alice"))
    await pull(client, "library/alpine", alpine)  # its token is had: no probe pays for it
    await cached_files(config)

    async def changed(method: str, path: str) -> dict[str, float]:
        before = await client_counts(client)
        resp = await client.request(method, path)
        assert resp.status == 404, await resp.text()
        after = await client_counts(client)
        return {
            name: after[name] - before.get(name, 0)
            for name in after
            if after[name] != before.get(name)
        }

    never = "sha256:" + "1" * 64
    for kind, cached in (("blobs", secret["layers"][0]), ("manifests", secret["digest"])):
        for method in ("GET", "HEAD", "GET"):  # asked upstream, then its 404 remembered
            seen = await changed(method, f"/v2/library/alpine/{kind}/{cached}")
            expected = await changed(method, f"/v2/library/alpine/{kind}/{never}")
            assert seen == expected, (kind, method)
    assert not [name for name in await client_counts(client) if "holdings" in name]
    checks = await holdings_checks(client)
    assert (checks[("blob", "refused")], checks[("manifest", "refused")]) == (3, 3)


async def test_a_repository_that_does_not_exist_serves_nothing_without_a_policy(
    hub: FakeHub, client: Client
) -> None:
    hub.scoped_blobs = True
    image = hub.content.add_image("library/app", "v1", [b"app layer"])
    await pull(client, "library/app", image)
    hub.stats.reset()
    for path in (
        f"/v2/doesnotexist/blobs/{image['layers'][0]}",
        f"/v2/doesnotexist/manifests/{image['digest']}",
        f"/v2/anything/at/all/blobs/{image['config']}",
    ):
        resp = await client.get(path)
        assert resp.status == 404, path
        assert error(await resp.read())["code"] in ("BLOB_UNKNOWN", "MANIFEST_UNKNOWN")
    assert {method for method, _ in registry_requests(hub)} == {"HEAD"}
    assert hub.stats["cdn_get"] == 0


async def test_a_layer_shared_by_two_repositories_is_served_after_one_confirmation(
    hub: FakeHub, client: Client
) -> None:
    hub.scoped_blobs = True
    base = b"a shared base layer" * 100
    one = hub.content.add_image("library/one", "v1", [base, b"one's own"])
    two = hub.content.add_image("library/two", "v1", [base, b"two's own"])
    await pull(client, "library/one", one)
    shared = one["layers"][0]
    assert shared == two["layers"][0]
    hub.stats.reset()

    for _ in range(3):  # the first asks the upstream under library/two; the others, nobody
        resp = await client.get(f"/v2/library/two/blobs/{shared}")
        assert resp.status == 200 and await resp.read() == base
    assert registry_requests(hub) == [("HEAD", f"/v2/library/two/blobs/{shared}")]
    assert hub.stats["cdn_get"] == 0  # from the cache
    assert (await holdings_checks(client))[("blob", "confirmed")] == 1

    # Through its own manifest, a repository's layers need no confirmation at all.
    three = hub.content.add_image("library/three", "v1", [base, b"three's own"])
    hub.stats.reset()
    await pull(client, "library/three", three)
    assert ("HEAD", f"/v2/library/three/blobs/{shared}") not in registry_requests(hub)
    assert hub.stats.cdn_get_by_digest[shared] == 0


async def test_an_index_names_its_children_for_its_repository(hub: FakeHub, client: Client) -> None:
    hub.scoped_blobs = True
    child = hub.content.add_image("library/multi", None, [b"amd64 layer"], OCI_MANIFEST)
    platform = {"os": "linux", "architecture": "amd64"}
    entry = (child["digest"], OCI_MANIFEST, len(child["manifest"]), platform)
    index = hub.content.add_index("library/multi", "v1", [entry])
    resp = await client.get("/v2/library/multi/manifests/v1", headers={"Accept": OCI_INDEX})
    assert resp.status == 200
    hub.stats.reset()
    resp = await client.get(
        f"/v2/library/multi/manifests/{child['digest']}", headers={"Accept": OCI_MANIFEST}
    )
    assert resp.status == 200 and await resp.read() == child["manifest"]
    for digest in [child["config"], *child["layers"]]:
        assert (await client.get(f"/v2/library/multi/blobs/{digest}")).status == 200
    assert not [m for m, _ in registry_requests(hub) if m == "HEAD"]
    # The index by digest elsewhere: refused.
    resp = await client.get(f"/v2/library/other/manifests/{index}", headers={"Accept": OCI_INDEX})
    assert resp.status == 404


async def test_referrers_under_another_repository_are_the_upstreams_answer(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, htpasswd: Path
) -> None:
    secret = hub.content.add_image("private/secret", "v1", [b"the secret layer"])
    signature = hub.content.add_artifact(
        "private/secret", secret["digest"], "application/vnd.dev.cosign.artifact.sig.v1+json",
        b"signature",
    )  # fmt: skip
    hub.content.add_image("library/alpine", "v1", [b"alpine layer"])
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd, RULES))
    alice = basic("alice")
    resp = await client.get(f"/v2/private/secret/referrers/{secret['digest']}", headers=alice)
    assert resp.status == 200 and signature in (await resp.text())
    hub.stats.reset()

    resp = await client.get(f"/v2/library/alpine/referrers/{secret['digest']}")
    body = await resp.read()
    assert resp.status == 200 and json.loads(body)["manifests"] == []  # as the upstream says
    resp = await client.get(f"/v2/library/doesnotexist/referrers/{secret['digest']}")
    assert resp.status == 404 and error(await resp.read())["code"] == "NAME_UNKNOWN"
    assert not [path for _, path in registry_requests(hub) if "private/" in path]
    resp = await client.get(f"/v2/library/alpine/manifests/{signature}")
    assert resp.status == 404


async def test_the_catalog_lists_only_what_the_client_may_pull(
    make_client: MakeClient,
    hub: FakeHub,
    ghcr: FakeHub,
    htpasswd: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(catalog_module, "SCAN_BATCH", 2)  # pages cross store batches
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd, RULES))
    for repo in ("library/a", "private/b", "private/c", "library/d", "private/e", "library/f"):
        image = hub.content.add_image(repo, "v1", [repo.encode()])
        who = basic("alice") if repo.startswith("private/") else {}
        await pull(client, repo, image, **who)

    async def page(who: dict[str, str], query: str) -> tuple[list[str], str | None]:
        resp = await client.get(f"/v2/_catalog{query}", headers=who)
        assert resp.status == 200, await resp.text()
        return (await resp.json())["repositories"], resp.headers.get("Link")

    assert (await page({}, ""))[0] == ["library/a", "library/d", "library/f"]
    assert (await page(basic("bob"), ""))[0] == ["library/a", "library/d", "library/f"]
    everything = ["library/a", "library/d", "library/f", "private/b", "private/c", "private/e"]
    assert (await page(basic("alice"), ""))[0] == everything
    names, link = await page({}, "?n=2")
    assert names == ["library/a", "library/d"]
    assert link == '</v2/_catalog?last=library%2Fd&n=2>; rel="next"'
    names, link = await page({}, "?n=2&last=library/d")
    assert (names, link) == (["library/f"], None)
    names, _ = await page({}, "?n=2&last=library/f")
    assert names == []


async def test_a_default_repository_named_like_another_upstream_is_listed_under_its_own_rules(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, htpasswd: Path
) -> None:
    """docker.io's `ghcr.io/corp/secret` (reached with `?ns=docker.io`) is catalogued and
    counted as `docker.io/ghcr.io/corp/secret`: as `ghcr.io/corp/secret` it would be taken
    for the ghcr.io upstream's `corp/secret` and shown to whoever may pull that."""
    rules = [
        {"who": ["alice"], "pull": ["**"]},
        {"who": ["*", "anonymous"], "pull": ["ghcr.io/**"]},
    ]
    secret = hub.content.add_image("ghcr.io/corp/secret", "v1", [b"corp secret"])
    public = ghcr.content.add_image("corp/public", "v1", [b"corp public"])
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd, rules))
    ambiguous = "/v2/ghcr.io/corp/secret/manifests/v1?ns=docker.io"
    # Anonymous clients may not pull it, alice may: challenged for a login.
    assert (await client.get(ambiguous, headers=MANIFEST_ACCEPT)).status == 401
    resp = await client.get(ambiguous, headers={**MANIFEST_ACCEPT, **basic("alice")})
    assert resp.status == 200, await resp.text()
    await pull(client, "ghcr.io/corp/public", public)
    listed = "docker.io/ghcr.io/corp/secret"

    async def names(who: dict[str, str]) -> list[str]:
        resp = await client.get("/v2/_catalog", headers=who)
        assert resp.status == 200, await resp.text()
        repositories: list[str] = (await resp.json())["repositories"]
        return repositories

    assert await names({}) == await names(basic("bob")) == ["ghcr.io/corp/public"]
    assert await names(basic("alice")) == [listed, "ghcr.io/corp/public"]
    page = await (await client.get("/")).text()
    assert "corp/secret" not in page and "ghcr.io/corp/public" in page
    assert listed in await (await client.get("/", headers=basic("alice"))).text()
    # The listed name pulls what it names, under the same rules.
    path = f"/v2/{listed}/manifests/v1"
    assert (await client.get(path, headers=MANIFEST_ACCEPT)).status == 401
    resp = await client.get(path, headers={**MANIFEST_ACCEPT, **basic("alice")})
    assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == secret["digest"]


async def test_holdings_recorded_by_one_app_are_honoured_by_another_on_the_same_redis(
    make_client: MakeClient, hub: FakeHub, redis_server: RedisServer
) -> None:
    conn = aioredis.Redis.from_url(redis_server.url)
    await conn.flushdb()
    hub.scoped_blobs = True
    base = b"a shared base layer" * 100
    one = hub.content.add_image("library/one", "v1", [base])
    two = hub.content.add_image("library/two", "v1", [base, b"two's own"])
    first = await make_client(redis=RedisConfig(url=redis_server.url))
    second = await make_client(redis=RedisConfig(url=redis_server.url))  # the same storage
    await pull(second, "library/one", one)  # the base layer is on the shared disk
    await pull(first, "library/two", two)  # ... and library/two holds it, says the first
    hub.stats.reset()

    resp = await second.get(f"/v2/library/two/blobs/{one['layers'][0]}")
    assert resp.status == 200 and await resp.read() == base
    assert hub.stats.requests == []  # no confirmation: the first app's record answered
    keys = [key.decode() async for key in conn.scan_iter(match="*holds*")]
    assert keys and all(key.startswith(KEY_PREFIX + "holds:") for key in keys)
    for key in keys:  # kept no longer than tag records
        assert 0 < await conn.ttl(key) <= 600 + 7 * 86400
    await conn.aclose()


@pytest.mark.parametrize("backend", ["memory", "redis", "sqlite"])
async def test_holdings_in_the_metadata_store(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    url = None
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        conn = aioredis.Redis.from_url(server.url)
        await conn.flushdb()
        await conn.aclose()
        url = server.url
    shared = tmp_path / "metadata.db" if backend == "sqlite" else None
    store = open_metadata(url, 60, 100, snapshot=tmp_path / "metadata.json", shared=shared)
    digest = "sha256:" + "a" * 64
    await store.add_holdings("docker.io", "library/a", [digest], 1e12)  # far ahead: fresh
    await store.add_holdings("docker.io", "library/old", [digest], 1.0)  # long past retention
    assert await store.holds("docker.io", "library/a", digest)
    assert not await store.holds("docker.io", "library/b", digest)
    assert not await store.holds("ghcr.io", "library/a", digest)
    assert not await store.holds("docker.io", "library/old", digest)
    await store.close()
    if backend == "memory":  # kept across a restart, in the snapshot
        again = open_metadata(None, 60, 100, snapshot=tmp_path / "metadata.json")
        await again.load()  # type: ignore[attr-defined]
        assert await again.holds("docker.io", "library/a", digest)
        assert "library/old" not in (tmp_path / "metadata.json").read_text()
    if backend == "sqlite":  # another process on the same file sees them
        other = open_metadata(None, 60, 100, shared=shared)
        assert await other.holds("docker.io", "library/a", digest)
        await other.close()


async def test_warm_records_what_each_repository_holds_though_cached(
    hub: FakeHub, config: Config, make_client: MakeClient
) -> None:
    hub.scoped_blobs = True
    image = hub.content.add_image("library/app", "latest", [b"warm layer"])
    report = await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    assert report.failures == []
    # The holdings lost (retention ended, an older mirror's cache): warm records them again.
    snapshot = config.storage.path / "metadata.json"
    data = json.loads(snapshot.read_text())
    data["holdings"] = []
    snapshot.write_text(json.dumps(data))
    report = await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    assert report.cached == 2 and report.fetched == 0
    client = await make_client()
    hub.stats.reset()
    for digest in [image["config"], *image["layers"]]:
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        assert resp.status == 200
    assert hub.stats.requests == []


async def test_a_confirmation_refused_is_remembered_briefly(hub: FakeHub, client: Client) -> None:
    hub.scoped_blobs = True
    image = hub.content.add_image("library/app", "v1", [b"app layer"])
    await pull(client, "library/app", image)
    hub.stats.reset()
    for _ in range(5):
        resp = await client.get(f"/v2/library/guess/blobs/{image['layers'][0]}")
        assert resp.status == 404
    assert len(registry_requests(hub)) == 1
    upstream = client.app[upstreams_key].default.name
    metadata = client.app[metadata_key]
    assert not await metadata.holds(upstream, "library/guess", image["layers"][0])
