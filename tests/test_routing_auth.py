"""Several upstreams behind one mirror, and client authentication, in process.

Two fake hubs on real ports play docker.io (the default upstream) and ghcr.io; a small
aiohttp app plays a registry that wants Basic auth. Every test that handles a secret
(upstream password, a password command's output, a client password, an issued token)
hands it to the `leaks` fixture, which checks that none appears in /metrics, in any
response the test received (errors included), or in any log record of the whole test.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import os
import shlex
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from mirror.access.clienttokens import TokenSigner
from mirror.config import AuthConfig, Config, UpstreamConfig
from tests.conftest import MakeClient
from tests.fakehub import Content, FakeHub
from tests.test_blobs import wait_cached

Client = TestClient[Any, Any]

UPSTREAM_USER = "mirror-bot"
UPSTREAM_PASSWORD = "upstream-Pa55-q8v3n1"
COMMAND_PASSWORD = "command-Pa55-z4k7w2"
CLIENT_USER = "alice"
CLIENT_PASSWORD = "client-Pa55-h6j9t0"
WRONG_PASSWORD = "wrong-Pa55-m2x5c8"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- the secret checker ---------------------------------------------------------------------


@dataclass
class Seen:
    what: str
    text: str


@dataclass
class Leaks:
    """Secrets of a test, and every response it saw, to look for the one in the other."""

    secrets: set[str] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)

    def add(self, *secrets: str) -> None:
        self.secrets.update(secret for secret in secrets if secret)

    def basic(self, user: str, password: str) -> dict[str, str]:
        """An Authorization header whose password (plain and encoded) counts as secret."""
        header = basic(user, password)
        self.add(password, header.partition(" ")[2])
        return {"Authorization": header}

    async def get(
        self, client: Client, path: str, *, method: str = "GET", issues_token: bool = False,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        """Send a request; its status, headers and body are kept for the final check
        (except a 200 from /token, whose body is the token itself)."""
        resp = await client.request(method, path, headers=headers or {})
        body = await resp.read()
        kept = dict(resp.headers)
        if not (issues_token and resp.status == 200):
            text = json.dumps(kept) + "\n" + body.decode(errors="replace")
            self.seen.append(Seen(f"{method} {path} -> {resp.status}", text))
        return resp.status, kept, body

    def find(self, text: str) -> list[str]:
        return sorted(secret for secret in self.secrets if secret in text)

    async def check_metrics(self, client: Client) -> None:
        text = await (await client.get("/metrics")).text()
        assert text, "no metrics"
        assert not self.find(text), f"secrets on /metrics: {self.find(text)}"

    def check_responses(self) -> None:
        leaked = {item.what: self.find(item.text) for item in self.seen if self.find(item.text)}
        assert not leaked, f"secrets in responses: {leaked}"

    def check_logs(self, records: list[logging.LogRecord]) -> None:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        leaked = [
            f"{text[:300]} <- {self.find(text)}"
            for text in (formatter.format(record) for record in records)
            if self.find(text)
        ]
        assert not leaked, "secrets in log records:\n" + "\n".join(leaked)


@pytest.fixture
def leaks(caplog: pytest.LogCaptureFixture) -> Iterator[Leaks]:
    """Every log record of the test is captured; at the end none may hold a secret."""
    caplog.set_level(logging.DEBUG)
    checker = Leaks()
    yield checker
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    assert records, "caplog captured nothing: the log check would prove nothing"
    checker.check_responses()
    checker.check_logs(records)


# --- upstreams ---------------------------------------------------------------------------------


@pytest.fixture
async def ghcr() -> AsyncIterator[FakeHub]:
    """A second fake hub, standing for ghcr.io."""
    async with FakeHub() as fake:
        yield fake


def add_image(hub: FakeHub, repo: str, tag: str, layer: bytes) -> dict[str, Any]:
    return hub.content.add_image(repo, tag, [layer])


async def two_upstreams(make_client: MakeClient, hub: FakeHub, ghcr: FakeHub) -> Client:
    """A mirror with docker.io (the default) and ghcr.io."""
    return await make_client(
        upstream=UpstreamConfig(url=hub.registry_url, name="docker.io"),
        upstreams=(UpstreamConfig(url=ghcr.registry_url, name="ghcr.io"),),
    )


async def manifest_digest(client: Client, path: str) -> str:
    resp = await client.get(path)
    body = await resp.read()
    assert resp.status == 200, f"GET {path}: {resp.status} {body[:300]!r}"
    return resp.headers["Docker-Content-Digest"]


def error_code(body: bytes) -> str:
    """The OCI error code of a JSON error body."""
    return str(json.loads(body)["errors"][0]["code"])


def link_target(link: str) -> str:
    """The URL of a `<url>; rel="next"` Link header."""
    target, sep, rest = link.partition(">")
    assert sep and target.startswith("<") and 'rel="next"' in rest, link
    return target[1:]


# --- routing -----------------------------------------------------------------------------------


async def test_ns_routes_to_each_upstream_and_tags_stay_apart(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub
) -> None:
    on_hub = add_image(hub, "owner/img", "v1", b"owner/img:v1 as docker.io has it")
    on_ghcr = add_image(ghcr, "owner/img", "v1", b"owner/img:v1 as ghcr.io has it")
    assert on_hub["digest"] != on_ghcr["digest"]
    client = await two_upstreams(make_client, hub, ghcr)
    # Twice: the second round is answered from the cache, where tags are kept per upstream.
    for _ in range(2):
        path = "/v2/owner/img/manifests/v1"
        assert await manifest_digest(client, f"{path}?ns=docker.io") == on_hub["digest"]
        assert await manifest_digest(client, f"{path}?ns=ghcr.io") == on_ghcr["digest"]
        assert await manifest_digest(client, path) == on_hub["digest"]  # the default
        # Docker Hub answers to its other names too.
        for alias in ("registry-1.docker.io", "index.docker.io"):
            assert await manifest_digest(client, f"{path}?ns={alias}") == on_hub["digest"]
    assert (hub.stats["manifest_get"], ghcr.stats["manifest_get"]) == (1, 1)
    config = await client.get(f"/v2/owner/img/blobs/{on_ghcr['config']}?ns=ghcr.io")
    assert config.status == 200
    assert json.loads(await config.read())["rootfs"]["diff_ids"] == on_ghcr["layers"]


async def test_path_prefix_routes_to_the_named_upstream(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub
) -> None:
    on_hub = add_image(hub, "owner/img", "v1", b"docker.io layer")
    on_ghcr = add_image(ghcr, "owner/img", "v1", b"ghcr.io layer")
    client = await two_upstreams(make_client, hub, ghcr)
    prefixed = "/v2/ghcr.io/owner/img/manifests/v1"
    assert await manifest_digest(client, prefixed) == on_ghcr["digest"]
    assert await manifest_digest(client, f"{prefixed}?ns=ghcr.io") == on_ghcr["digest"]
    by_default_name = "/v2/docker.io/owner/img/manifests/v1"
    assert await manifest_digest(client, by_default_name) == on_hub["digest"]
    layer = on_ghcr["layers"][0]
    resp = await client.get(f"/v2/ghcr.io/owner/img/blobs/{layer}")
    assert resp.status == 200
    assert await resp.read() == b"ghcr.io layer"
    # The upstream is asked for its own name, without the prefix.
    paths = {path.partition("?")[0] for app, _, path in ghcr.stats.requests if app == "registry"}
    assert "/v2/owner/img/manifests/v1" in paths
    assert f"/v2/owner/img/blobs/{layer}" in paths
    assert not any("ghcr.io" in path for path in paths), paths


async def test_unknown_ns_is_an_oci_name_unknown(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub
) -> None:
    add_image(hub, "owner/img", "v1", b"layer")
    client = await two_upstreams(make_client, hub, ghcr)
    digest = "sha256:" + "a" * 64
    for path in (
        "/v2/owner/img/manifests/v1?ns=quay.io",
        f"/v2/owner/img/blobs/{digest}?ns=quay.io",
        "/v2/owner/img/tags/list?ns=quay.io",
    ):
        resp = await client.get(path)
        body = await resp.read()
        assert resp.status == 404, (path, body)
        assert resp.content_type == "application/json"
        assert error_code(body) == "NAME_UNKNOWN", body
        assert "quay.io" in json.loads(body)["errors"][0]["message"]
    head = await client.head("/v2/owner/img/manifests/v1?ns=quay.io")
    assert head.status == 404
    assert hub.stats.requests == [] and ghcr.stats.requests == []


async def test_a_blob_is_stored_once_and_shared_by_upstreams(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, config: Config
) -> None:
    shared = b"one layer that two registries both hold"
    on_hub = add_image(hub, "owner/img", "v1", shared)
    add_image(ghcr, "other/app", "v2", shared)
    layer = on_hub["layers"][0]
    client = await two_upstreams(make_client, hub, ghcr)
    first = await client.get(f"/v2/owner/img/blobs/{layer}?ns=docker.io")
    assert first.status == 200 and await first.read() == shared
    assert hub.stats["cdn_get"] == 1
    for path in (f"/v2/other/app/blobs/{layer}?ns=ghcr.io", f"/v2/ghcr.io/other/app/blobs/{layer}"):
        again = await client.get(path)
        assert again.status == 200 and await again.read() == shared
    # Served under ghcr.io once ghcr.io sent the bytes itself (checked, not stored again):
    # docker.io's copy says nothing of what ghcr.io holds.
    assert ghcr.stats["blob_get"] == 1 and ghcr.stats["cdn_get"] == 1, ghcr.stats.requests
    # The client has the last byte once the hash matched; the rename into place follows.
    await wait_cached(config, layer)
    hex_digest = layer.partition(":")[2]
    copies = [
        Path(root) / name
        for root, _, names in os.walk(config.storage.path)
        for name in names
        if hex_digest in name
    ]
    assert len(copies) == 1, copies


async def test_catalog_lists_other_upstreams_with_their_prefix(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub
) -> None:
    add_image(hub, "owner/img", "v1", b"hub")
    add_image(ghcr, "owner/img", "v1", b"ghcr")
    client = await two_upstreams(make_client, hub, ghcr)
    await manifest_digest(client, "/v2/owner/img/manifests/v1?ns=docker.io")
    await manifest_digest(client, "/v2/owner/img/manifests/v1?ns=ghcr.io")
    resp = await client.get("/v2/_catalog")
    assert resp.status == 200
    assert (await resp.json())["repositories"] == ["ghcr.io/owner/img", "owner/img"]


async def test_tags_list_link_keeps_the_prefix_and_the_ns(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub
) -> None:
    for tag in ("x1", "x2", "x3"):
        add_image(hub, "owner/img", tag, f"hub {tag}".encode())
    for tag in ("a", "b", "c"):
        add_image(ghcr, "owner/img", tag, f"ghcr {tag}".encode())
    client = await two_upstreams(make_client, hub, ghcr)

    resp = await client.get("/v2/ghcr.io/owner/img/tags/list?n=2")
    assert resp.status == 200
    assert (await resp.json())["tags"] == ["a", "b"]
    assert resp.headers["Link"] == '</v2/ghcr.io/owner/img/tags/list?last=b&n=2>; rel="next"'
    follow = await client.get(link_target(resp.headers["Link"]))
    assert (await follow.json())["tags"] == ["c"]

    resp = await client.get("/v2/owner/img/tags/list?n=2&ns=ghcr.io")
    assert (await resp.json())["tags"] == ["a", "b"]
    target = urlsplit(link_target(resp.headers["Link"]))
    assert target.path == "/v2/owner/img/tags/list"
    assert parse_qs(target.query) == {"last": ["b"], "n": ["2"], "ns": ["ghcr.io"]}
    follow = await client.get(link_target(resp.headers["Link"]))
    assert (await follow.json())["tags"] == ["c"]

    resp = await client.get("/v2/owner/img/tags/list?n=2")  # the default upstream
    assert (await resp.json())["tags"] == ["x1", "x2"]
    assert resp.headers["Link"] == '</v2/owner/img/tags/list?last=x2&n=2>; rel="next"'


# --- an upstream with Basic auth -------------------------------------------------------------


@dataclass
class BasicRegistry:
    """A registry that answers 401 `Basic realm="x"` unless given the right credentials."""

    user: str
    password: str
    content: Content = field(default_factory=Content)
    refused: int = 0
    served: int = 0
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/v2/", self._v2)
        app.router.add_get("/v2/{name:.+}/manifests/{ref}", self._manifest)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != basic(self.user, self.password):
            self.refused += 1
            body = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
            return web.json_response(
                body, status=401, headers={"WWW-Authenticate": 'Basic realm="x"'}
            )
        self.served += 1
        response: web.StreamResponse = await handler(request)
        return response

    async def _v2(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _manifest(self, request: web.Request) -> web.Response:
        found = self.content.resolve(request.match_info["name"], request.match_info["ref"])
        if found is None:
            body = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
            return web.json_response(body, status=404)
        digest, media_type, data = found
        return web.Response(
            body=data, headers={"Content-Type": media_type, "Docker-Content-Digest": digest}
        )

    async def _blob(self, request: web.Request) -> web.Response:
        data = self.content.blobs.get(request.match_info["digest"])
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        return web.Response(body=data, content_type="application/octet-stream")


async def start_basic_registry(aiohttp_server: Any, password: str) -> BasicRegistry:
    registry = BasicRegistry(UPSTREAM_USER, password)
    for tag in ("v1", "v2", "v3"):
        registry.content.add_image("team/app", tag, [f"team/app:{tag}".encode()])
    server: TestServer = await aiohttp_server(registry.app())
    registry.url = f"http://127.0.0.1:{server.port}"
    return registry


async def basic_mirror(make_client: MakeClient, registry: BasicRegistry, **upstream: Any) -> Client:
    return await make_client(
        upstreams=(UpstreamConfig(url=registry.url, name="registry.example", **upstream),)
    )


async def test_basic_auth_upstream_with_credentials(
    make_client: MakeClient, aiohttp_server: Any, hub: FakeHub, leaks: Leaks
) -> None:
    registry = await start_basic_registry(aiohttp_server, UPSTREAM_PASSWORD)
    leaks.basic(UPSTREAM_USER, UPSTREAM_PASSWORD)
    client = await basic_mirror(
        make_client, registry, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD
    )
    want = registry.content.resolve("team/app", "v1")
    assert want is not None
    status, headers, body = await leaks.get(client, "/v2/registry.example/team/app/manifests/v1")
    assert status == 200, body
    assert headers["Docker-Content-Digest"] == want[0] and body == want[2]
    status, headers, _ = await leaks.get(client, "/v2/team/app/manifests/v2?ns=registry.example")
    assert status == 200
    config = json.loads(want[2])["config"]["digest"]
    status, _, body = await leaks.get(client, f"/v2/registry.example/team/app/blobs/{config}")
    assert status == 200 and body == registry.content.blobs[config]
    # One challenge, answered; after it the mirror sends Basic credentials straight away
    # (each tag: a HEAD, then a GET of its digest; and the blob).
    assert registry.refused == 1 and registry.served == 5
    await leaks.check_metrics(client)


async def test_basic_auth_upstream_without_or_with_wrong_credentials(
    make_client: MakeClient, aiohttp_server: Any, hub: FakeHub, leaks: Leaks
) -> None:
    registry = await start_basic_registry(aiohttp_server, UPSTREAM_PASSWORD)
    leaks.basic(UPSTREAM_USER, UPSTREAM_PASSWORD)
    leaks.basic(UPSTREAM_USER, WRONG_PASSWORD)
    anonymous = await basic_mirror(make_client, registry)
    wrong = await basic_mirror(
        make_client, registry, username=UPSTREAM_USER, password=WRONG_PASSWORD
    )
    for client in (anonymous, wrong):
        for path in (
            "/v2/registry.example/team/app/manifests/v1",
            "/v2/team/app/manifests/v1?ns=registry.example",
        ):
            status, headers, body = await leaks.get(client, path)
            assert status == 401, body
            assert error_code(body) == "UNAUTHORIZED", body
            # The upstream's challenge is the mirror's business, never the client's.
            assert "WWW-Authenticate" not in headers, headers
        await leaks.check_metrics(client)
    assert registry.served == 0


async def test_password_command_output_is_the_password(
    make_client: MakeClient, aiohttp_server: Any, hub: FakeHub, leaks: Leaks
) -> None:
    registry = await start_basic_registry(aiohttp_server, COMMAND_PASSWORD)
    leaks.basic(UPSTREAM_USER, COMMAND_PASSWORD)
    client = await basic_mirror(
        make_client,
        registry,
        username=UPSTREAM_USER,
        password_command=f"echo {shlex.quote(COMMAND_PASSWORD)}",
    )
    status, _, body = await leaks.get(client, "/v2/registry.example/team/app/manifests/v1")
    assert status == 200, body
    await leaks.check_metrics(client)


async def test_password_command_runs_again_after_password_refresh(
    make_client: MakeClient, aiohttp_server: Any, hub: FakeHub, leaks: Leaks, tmp_path: Path
) -> None:
    registry = await start_basic_registry(aiohttp_server, COMMAND_PASSWORD)
    leaks.basic(UPSTREAM_USER, COMMAND_PASSWORD)
    runs = tmp_path / "runs"
    command = f"echo run >> {shlex.quote(str(runs))}; echo {shlex.quote(COMMAND_PASSWORD)}"
    refresh = 2.0  # wide: two pulls must fit in it on a loaded CI machine
    client = await basic_mirror(
        make_client,
        registry,
        username=UPSTREAM_USER,
        password_command=command,
        password_refresh=refresh,
    )

    def count() -> int:
        return len(runs.read_text().splitlines()) if runs.exists() else 0

    assert count() == 0, "the command ran before anything needed it"
    started = time.monotonic()
    for tag in ("v1", "v2"):
        status, _, body = await leaks.get(client, f"/v2/registry.example/team/app/manifests/{tag}")
        assert status == 200, body
    assert time.monotonic() - started < refresh, "too slow to tell a rerun from a refresh"
    assert count() == 1
    await asyncio.sleep(refresh + 0.1)
    status, _, body = await leaks.get(client, "/v2/registry.example/team/app/manifests/v3")
    assert status == 200, body
    assert count() == 2
    assert registry.refused == 1
    await leaks.check_metrics(client)


# --- client authentication -------------------------------------------------------------------


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    """alice's and bob's bcrypt hashes (cost 4: fast tests; the format is the same)."""
    path = tmp_path / "htpasswd"
    lines = [
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for user, password in ((CLIENT_USER, CLIENT_PASSWORD), ("bob", "bobs-Pa55-r7p1"))
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def pullable(hub: FakeHub) -> dict[str, Any]:
    """library/busybox and library/other on the default upstream."""
    add_image(hub, "library/other", "latest", b"another layer")
    return add_image(hub, "library/busybox", "latest", b"busybox layer")


async def auth_mirror(
    make_client: MakeClient, htpasswd: Path, anonymous_pull: bool = False, **changes: Any
) -> Client:
    auth = AuthConfig(htpasswd=htpasswd, anonymous_pull=anonymous_pull, **changes.pop("auth", {}))
    return await make_client(auth=auth, **changes)


def own_address(client: Client) -> str:
    url = client.make_url("/")
    return f"{url.host}:{url.port}"


async def get_token(leaks: Leaks, client: Client, scope: str | None, **headers: str) -> str:
    path = "/token?service=mirror" + (f"&scope={scope}" if scope else "")
    status, _, body = await leaks.get(client, path, issues_token=True, headers=headers)
    assert status == 200, body
    answer = json.loads(body)
    assert answer["token"] == answer["access_token"]
    leaks.add(answer["token"])
    return str(answer["token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_api_paths_challenge_with_the_mirrors_own_realm(
    make_client: MakeClient, htpasswd: Path, hub: FakeHub, pullable: dict[str, Any], leaks: Leaks
) -> None:
    client = await auth_mirror(make_client, htpasswd)
    address = own_address(client)
    realm = f'Bearer realm="http://{address}/token",service="{address}"'
    status, headers, body = await leaks.get(client, "/v2/")
    assert status == 401 and error_code(body) == "UNAUTHORIZED", body
    assert headers["WWW-Authenticate"] == realm
    layer = pullable["layers"][0]
    for path in (
        "/v2/library/busybox/manifests/latest",
        f"/v2/library/busybox/blobs/{layer}",
        "/v2/library/busybox/tags/list",
        f"/v2/library/busybox/referrers/{pullable['digest']}",
    ):
        for method in ("GET", "HEAD"):
            status, headers, body = await leaks.get(client, path, method=method)
            assert status == 401, (method, path, body)
            assert headers["WWW-Authenticate"] == (
                realm + ',scope="repository:library/busybox:pull"'
            ), (method, path)
    status, headers, _ = await leaks.get(client, "/v2/_catalog")
    assert status == 401 and headers["WWW-Authenticate"] == realm
    # Nothing reached the upstream, and its token service is never named to clients.
    assert hub.stats.requests == []
    assert all(hub.token_url not in item.text for item in leaks.seen)


async def test_token_endpoint_checks_basic_credentials(
    make_client: MakeClient, htpasswd: Path, hub: FakeHub, leaks: Leaks
) -> None:
    client = await auth_mirror(make_client, htpasswd)
    scope = "repository:library/busybox:pull"
    token = await get_token(leaks, client, scope, **leaks.basic(CLIENT_USER, CLIENT_PASSWORD))
    assert token.count(".") == 2
    status, _, body = await leaks.get(
        client, f"/token?scope={scope}", issues_token=True,
        headers=leaks.basic(CLIENT_USER, CLIENT_PASSWORD),
    )  # fmt: skip
    assert status == 200 and json.loads(body)["expires_in"] == 300
    leaks.add(json.loads(body)["token"])
    for headers in (
        leaks.basic(CLIENT_USER, WRONG_PASSWORD),
        leaks.basic("mallory", CLIENT_PASSWORD),
        {"Authorization": "Basic not-base64!"},
        {"Authorization": f"Bearer {token}"},
        {},
    ):
        status, answer, body = await leaks.get(
            client, f"/token?scope={scope}", issues_token=True, headers=headers
        )
        assert status == 401, (headers, body)
        assert error_code(body) == "UNAUTHORIZED"
        assert "token" not in json.loads(body)
        assert answer["WWW-Authenticate"].startswith("Basic ")
    await leaks.check_metrics(client)


async def test_a_token_pulls_its_repository_and_no_other(
    make_client: MakeClient, htpasswd: Path, hub: FakeHub, pullable: dict[str, Any], leaks: Leaks
) -> None:
    client = await auth_mirror(make_client, htpasswd)
    creds = leaks.basic(CLIENT_USER, CLIENT_PASSWORD)
    token = await get_token(leaks, client, "repository:library/busybox:pull", **creds)
    status, headers, body = await leaks.get(
        client, "/v2/library/busybox/manifests/latest", headers=bearer(token)
    )
    assert status == 200, body
    assert headers["Docker-Content-Digest"] == pullable["digest"]
    layer = pullable["layers"][0]
    status, _, body = await leaks.get(
        client, f"/v2/library/busybox/blobs/{layer}", headers=bearer(token)
    )
    assert status == 200 and body == b"busybox layer"
    status, _, _ = await leaks.get(client, "/v2/", headers=bearer(token))
    assert status == 200
    status, headers, body = await leaks.get(
        client, "/v2/library/other/manifests/latest", headers=bearer(token)
    )
    assert status == 401 and error_code(body) == "UNAUTHORIZED", body
    assert headers["WWW-Authenticate"].endswith(',scope="repository:library/other:pull"')
    # A login token (no scope, as `docker login` asks) opens /v2/ and no repository.
    login = await get_token(leaks, client, None, **creds)
    assert (await leaks.get(client, "/v2/", headers=bearer(login)))[0] == 200
    status, _, _ = await leaks.get(
        client, "/v2/library/busybox/manifests/latest", headers=bearer(login)
    )
    assert status == 401
    # Several scopes in one request, as containerd sends them.
    both = await get_token(
        leaks, client, "repository:library/busybox:pull repository:library/other:pull", **creds
    )
    for repo in ("library/busybox", "library/other"):
        status, _, _ = await leaks.get(client, f"/v2/{repo}/manifests/latest", headers=bearer(both))
        assert status == 200, repo
    # The client's credentials are the mirror's to check, never the upstream's to see.
    assert hub.stats["token_basic"] == 0 and hub.stats.token_users == []
    await leaks.check_metrics(client)


async def test_basic_credentials_on_api_requests(
    make_client: MakeClient, htpasswd: Path, hub: FakeHub, pullable: dict[str, Any], leaks: Leaks
) -> None:
    client = await auth_mirror(make_client, htpasswd)
    right = leaks.basic(CLIENT_USER, CLIENT_PASSWORD)
    for _ in range(2):  # the second check comes from the verified-credentials cache
        status, headers, body = await leaks.get(
            client, "/v2/library/busybox/manifests/latest", headers=right
        )
        assert status == 200, body
        assert headers["Docker-Content-Digest"] == pullable["digest"]
    status, _, _ = await leaks.get(client, "/v2/library/other/manifests/latest", headers=right)
    assert status == 200
    for wrong in (leaks.basic(CLIENT_USER, WRONG_PASSWORD), leaks.basic("mallory", "x-y-z-1")):
        status, headers, body = await leaks.get(
            client, "/v2/library/busybox/manifests/latest", headers=wrong
        )
        assert status == 401 and error_code(body) == "UNAUTHORIZED", body
        assert headers["WWW-Authenticate"].startswith("Bearer realm=")
    assert hub.stats["token_basic"] == 0 and hub.stats.token_users == []
    await leaks.check_metrics(client)


async def test_odd_basic_credentials_are_refused_with_a_401(
    make_client: MakeClient, htpasswd: Path, hub: FakeHub, leaks: Leaks
) -> None:
    """Not base64 of ASCII, or a password longer than bcrypt reads: they were 500s."""
    client = await auth_mirror(make_client, htpasswd)
    too_long = CLIENT_PASSWORD + "x" * 72  # bcrypt 5 raises past 72 bytes
    for headers in (
        {"Authorization": "Basic \u00e9t\u00e9"},
        leaks.basic(CLIENT_USER, too_long),
        leaks.basic(CLIENT_USER, "\u00e9" * 37),
    ):
        status, _, body = await leaks.get(client, "/v2/library/busybox/tags/list", headers=headers)
        assert status == 401 and error_code(body) == "UNAUTHORIZED", (headers, body)
        status, _, body = await leaks.get(client, "/token", headers=headers)
        assert status == 401 and error_code(body) == "UNAUTHORIZED", (headers, body)
    assert hub.stats.requests == []


async def test_a_challenge_survives_odd_names_and_hosts(
    make_client: MakeClient, htpasswd: Path, hub: FakeHub, leaks: Leaks
) -> None:
    """A decoded path with CR, LF or NUL never reaches the challenge header (that was a
    500, or no answer at all), nor does a Host no URL can hold break it."""
    client = await auth_mirror(make_client, htpasswd)
    address = own_address(client)
    for name in ("a%0d%0aSet-Cookie:%20x=1", "a/..%00/b", "a%22b"):
        url = URL(f"http://{address}/v2/{name}/manifests/latest", encoded=True)
        resp = await client.session.get(url)
        assert resp.status == 401 and error_code(await resp.read()) == "UNAUTHORIZED"
        assert "scope=" not in resp.headers["WWW-Authenticate"]
        assert "Set-Cookie" not in resp.headers
    for headers in ({"Host": "[::1"}, {"X-Forwarded-Host": "["}):
        status, answer, body = await leaks.get(
            client, "/v2/library/busybox/tags/list", headers=headers
        )
        assert status == 401 and error_code(body) == "UNAUTHORIZED", (headers, body)
        assert answer["WWW-Authenticate"].startswith("Bearer realm=")
    assert hub.stats.requests == []


async def test_anonymous_pull(
    make_client: MakeClient, htpasswd: Path, hub: FakeHub, pullable: dict[str, Any], leaks: Leaks
) -> None:
    client = await auth_mirror(make_client, htpasswd, anonymous_pull=True)
    status, headers, body = await leaks.get(client, "/v2/library/busybox/manifests/latest")
    assert status == 200, body
    assert headers["Docker-Content-Digest"] == pullable["digest"]
    # The ping is challenged, so that Docker knows to log in where it has a login; an
    # anonymous client fetches an anonymous token then.
    status, headers, _ = await leaks.get(client, "/v2/")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer realm=")
    token = await get_token(leaks, client, "repository:library/busybox:pull")
    assert (await leaks.get(client, "/v2/", headers=bearer(token)))[0] == 200
    status, _, _ = await leaks.get(
        client, "/v2/library/busybox/manifests/latest", headers=bearer(token)
    )
    assert status == 200
    named = await get_token(
        leaks, client, "repository:library/busybox:pull",
        **leaks.basic(CLIENT_USER, CLIENT_PASSWORD),
    )  # fmt: skip
    status, _, _ = await leaks.get(
        client, "/v2/library/busybox/manifests/latest", headers=bearer(named)
    )
    assert status == 200
    # A token for another repository is challenged for the right scope, as registries do.
    status, headers, _ = await leaks.get(
        client, "/v2/library/other/manifests/latest", headers=bearer(named)
    )
    assert status == 401
    assert headers["WWW-Authenticate"].endswith(',scope="repository:library/other:pull"')
    await leaks.check_metrics(client)


async def test_public_url_is_the_realm(
    make_client: MakeClient, htpasswd: Path, hub: FakeHub, leaks: Leaks
) -> None:
    client = await auth_mirror(make_client, htpasswd, public_url="https://mirror.example.com")
    want = 'Bearer realm="https://mirror.example.com/token",service="mirror.example.com"'
    for headers in ({}, {"X-Forwarded-Proto": "http", "X-Forwarded-Host": "proxy.internal"}):
        status, answer, _ = await leaks.get(client, "/v2/", headers=headers)
        assert status == 401 and answer["WWW-Authenticate"] == want, headers


async def test_forwarded_headers_make_the_realm(
    make_client: MakeClient, htpasswd: Path, hub: FakeHub, leaks: Leaks
) -> None:
    proxy = (ipaddress.ip_network("127.0.0.1/32"),)  # headers are believed from it only
    client = await auth_mirror(make_client, htpasswd, trusted_proxies=proxy)
    for headers, base in (
        (
            {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "mirror.corp.example:8443"},
            "https://mirror.corp.example:8443",
        ),
        (  # a chain of two trusted proxies: the first (the client-facing one) counts
            {
                "X-Forwarded-For": "203.0.113.9, 127.0.0.1",
                "X-Forwarded-Proto": "https, http",
                "X-Forwarded-Host": "edge.example, lb.local",
            },
            "https://edge.example",
        ),
        (  # one proxy, which appended its own after values its client made up
            {
                "X-Forwarded-For": "203.0.113.9",
                "X-Forwarded-Proto": "http, https",
                "X-Forwarded-Host": "evil.example, mirror.corp.example",
            },
            "https://mirror.corp.example",
        ),
        ({"X-Forwarded-Proto": "https"}, f"https://{own_address(client)}"),
    ):
        status, answer, _ = await leaks.get(client, "/v2/", headers=headers)
        assert status == 401
        netloc = urlsplit(base).netloc
        assert answer["WWW-Authenticate"] == f'Bearer realm="{base}/token",service="{netloc}"'


def jwt_part(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    result: dict[str, Any] = json.loads(raw)
    return result


async def test_an_expired_token_is_refused(
    make_client: MakeClient,
    htpasswd: Path,
    hub: FakeHub,
    pullable: dict[str, Any],
    leaks: Leaks,
    config: Config,
) -> None:
    client = await auth_mirror(make_client, htpasswd, auth={"token_ttl": 2.0})
    creds = leaks.basic(CLIENT_USER, CLIENT_PASSWORD)
    path = "/v2/library/busybox/manifests/latest"
    status, _, body = await leaks.get(
        client, "/token?scope=repository:library/busybox:pull", issues_token=True, headers=creds
    )
    assert status == 200 and json.loads(body)["expires_in"] == 2
    token = json.loads(body)["token"]
    leaks.add(token)
    assert (await leaks.get(client, path, headers=bearer(token)))[0] == 200
    await asyncio.sleep(max(0.0, jwt_claims(token)["exp"] - time.time()) + 0.1)
    status, headers, body = await leaks.get(client, path, headers=bearer(token))
    assert status == 401 and error_code(body) == "UNAUTHORIZED", body
    assert headers["WWW-Authenticate"].startswith("Bearer realm=")
    # Signed with the mirror's own key, yet expired: refused all the same.
    key = (config.storage.path / "auth" / "signing.key").read_bytes().strip()
    aud = own_address(client)
    old, _ = TokenSigner(key).issue(CLIENT_USER, ["library/busybox"], -60, audience=aud)
    leaks.add(old)
    assert (await leaks.get(client, path, headers=bearer(old)))[0] == 401
    good, _ = TokenSigner(key).issue(CLIENT_USER, ["library/busybox"], 60, audience=aud)
    leaks.add(good)
    assert (await leaks.get(client, path, headers=bearer(good)))[0] == 200
    await leaks.check_metrics(client)


async def test_a_tampered_token_is_refused(
    make_client: MakeClient, htpasswd: Path, hub: FakeHub, pullable: dict[str, Any], leaks: Leaks
) -> None:
    client = await auth_mirror(make_client, htpasswd)
    creds = leaks.basic(CLIENT_USER, CLIENT_PASSWORD)
    token = await get_token(leaks, client, "repository:library/busybox:pull", **creds)
    header, payload, signature = token.split(".")
    claims = jwt_claims(token)
    claims["access"] = [{"type": "repository", "name": "library/other", "actions": ["pull"]}]
    widened = f"{header}.{jwt_part(claims)}.{signature}"
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    unsigned = f"{jwt_part({'alg': 'none', 'typ': 'JWT'})}.{jwt_part(claims)}."
    other_key = b"another mirror's key, 32 bytes or more"
    foreign, _ = TokenSigner(other_key).issue(
        CLIENT_USER, ["library/other"], 300, audience=own_address(client)
    )
    leaks.add(widened, unsigned, foreign, f"{header}.{payload}.{flipped}")
    cases = {
        "payload widened to library/other": (widened, "library/other"),
        "payload widened, asked for the original": (widened, "library/busybox"),
        "signature changed": (f"{header}.{payload}.{flipped}", "library/busybox"),
        "alg none, no signature": (unsigned, "library/other"),
        "signed with another key": (foreign, "library/other"),
        "garbage": ("not.a-token", "library/busybox"),
    }
    for what, (forged, repo) in cases.items():
        status, _, body = await leaks.get(
            client, f"/v2/{repo}/manifests/latest", headers=bearer(forged)
        )
        assert status == 401, (what, body)
    status, _, _ = await leaks.get(
        client, "/v2/library/busybox/manifests/latest", headers=bearer(token)
    )
    assert status == 200
    await leaks.check_metrics(client)
