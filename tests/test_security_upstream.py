"""A hostile upstream cannot take the mirror's credentials elsewhere or turn it on its network.

Each test makes the attack as an upstream would (a redirect, a token realm, a URL in
Redis), then checks the refusal (502 naming the upstream and the refused host), its
counter, and that nothing reached the target (a canary that counts connections), the cache
or the log. Every server here is on loopback: the public-address rule is shown with a
resolver that answers what the test says, and a connector whose connections are recorded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient, TestServer

from mirror.cluster.blobflight import BlobFlight
from mirror.cluster.lease import Leases
from mirror.cluster.peers import PeerClient, PeerRefused, PeerUnavailable
from mirror.config import (
    CacheConfig,
    Config,
    ConfigError,
    StorageConfig,
    UpstreamConfig,
    apply_overrides,
    config_from_mapping,
)
from mirror.net import addresses
from mirror.net.addresses import AddressRefused, PublicResolver, is_public, literal_address
from mirror.observe.metrics import Metrics
from mirror.oci.errors import BlobTooLarge
from mirror.oci.reference import parse_digest
from mirror.upstream.body import TooLong
from mirror.web.app import create_app
from mirror.web.keys import metrics_key
from tests.certs import CA
from tests.fakehub import Content

Client = TestClient[Any, Any]
USER, PASSWORD = "mirror-bot", "upstream-Pa55-r7k2w9"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
REPO = "team/app"
DIGEST = "sha256:" + "a" * 64
KINDS = {
    "manifest": f"/v2/{REPO}/manifests/v1",
    "blob": f"/v2/{REPO}/blobs/{DIGEST}",
    "tags": f"/v2/{REPO}/tags/list",
    "referrers": f"/v2/{REPO}/referrers/{DIGEST}",
}


# --- the parts: a canary, a hostile upstream, a resolver that says what the test wants ---------


class Canary:
    """A TCP port that counts the connections made to it (and answers nothing)."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1") -> Canary:
        self._server = await asyncio.start_server(self._accept, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Hostile:
    """An upstream that challenges with `challenge` (a Bearer realm) or for Basic
    USER:PASSWORD (unless `anonymous`), then redirects every API call but `/v2/` to
    `location`, or serves `content`."""

    location: str | None = None
    challenge: str | None = None
    token: str = "issued-token-x1"
    anonymous: bool = False
    content: Content = field(default_factory=Content)
    authorizations: list[str] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/", self._v2)
        app.router.add_route("*", "/v2/{rest:.+}", self._api)
        return app

    async def _v2(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _api(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        self.authorizations.append(authorization)
        if self.challenge is not None and authorization != f"Bearer {self.token}":
            return web.json_response({}, status=401, headers={"WWW-Authenticate": self.challenge})
        if not self.anonymous and authorization not in (BASIC, f"Bearer {self.token}"):
            return web.json_response(
                {}, status=401, headers={"WWW-Authenticate": 'Basic realm="x"'}
            )
        if self.location is not None:
            return web.Response(status=307, headers={"Location": self.location})
        name, _, ref = request.match_info["rest"].rpartition("/manifests/")
        found = self.content.resolve(name, ref)
        if found is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        digest, media_type, data = found
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
        return web.Response(body=data, headers=headers)


class FakeResolver(AbstractResolver):
    """Answers `answers[host]` for every lookup, and counts them."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups += 1
        return [
            {"hostname": host, "host": address, "port": port, "flags": 0, "proto": 0,
             "family": socket.AF_INET6 if ":" in address else socket.AF_INET}
            for address in self.answers.get(host, [])
        ]  # fmt: skip

    async def close(self) -> None:
        pass


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    found = await Canary().start()
    yield found
    await found.close()


@pytest.fixture
def tls(tmp_path: Path) -> tuple[CA, ssl.SSLContext]:
    """A test CA and a server context for 127.0.0.1 signed by it."""
    ca = CA(tmp_path / "ca")
    pair = ca.issue("upstream")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert, pair.key)
    return ca, context


async def serve(
    aiohttp_server: Any, hostile: Hostile, context: ssl.SSLContext | None = None
) -> str:
    server: TestServer = await aiohttp_server(hostile.app(), ssl=context)
    hostile.url = f"{'https' if context else 'http'}://127.0.0.1:{server.port}"
    return hostile.url


MakeMirror = Callable[..., Awaitable[Client]]


@pytest.fixture
def make_mirror(aiohttp_client: Any, tmp_path: Path) -> MakeMirror:
    """A mirror in front of one upstream (keywords: its UpstreamConfig fields)."""

    async def make(**upstream: Any) -> Client:
        config = Config(
            host="127.0.0.1",
            port=0,
            upstream=UpstreamConfig(connect_timeout=2, read_timeout=5, **upstream),
            storage=StorageConfig(path=tmp_path / "data"),
            cache=CacheConfig(tag_ttl=600),
        )
        client: Client = await aiohttp_client(create_app(config))
        return client

    return make


def sample(client: Client, name: str, **labels: str) -> float:
    value = client.app[metrics_key].registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def stored_files(root: Path) -> list[Path]:
    """Blobs and manifests in the cache directory."""
    return [p for kind in ("blobs", "manifests") for p in (root / kind).rglob("*") if p.is_file()]


async def refused(client: Client, path: str, *names: str) -> str:
    """GET path: a 502 whose message names each of `names`; the message."""
    resp = await client.get(path)
    body = await resp.text()
    assert resp.status == 502, (resp.status, body)
    message = json.loads(body)["errors"][0]["message"]
    for name in names:
        assert name in message, (name, message)
    return message


def no_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert PASSWORD not in text and BASIC.split()[1] not in text


# --- item 2: credentials never over plain HTTP nor to a host not meant for them -------------


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_https_upstream_redirecting_to_plain_http_on_its_own_host_is_refused(
    aiohttp_server: Any,
    make_mirror: MakeMirror,
    tls: tuple[CA, ssl.SSLContext],
    canary: Canary,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    ca, context = tls
    hostile = Hostile(location=f"http://127.0.0.1:{canary.port}/steal")
    url = await serve(aiohttp_server, hostile, context)
    client = await make_mirror(url=url, ca_file=ca.cert, username=USER, password=PASSWORD)

    name = url.removeprefix("https://")
    await refused(client, KINDS[kind], name, f"127.0.0.1:{canary.port}", "plain HTTP")

    assert canary.connections == 0  # the credentials went nowhere, over nothing
    assert BASIC in hostile.authorizations  # the mirror had credentials to lose
    assert sample(client, "mirror_upstream_redirects_refused_total", upstream=name) >= 1
    assert stored_files(tmp_path / "data") == []
    no_secret_logged(caplog)


async def test_plain_http_realm_for_an_https_upstream_is_refused(
    aiohttp_server: Any,
    make_mirror: MakeMirror,
    tls: tuple[CA, ssl.SSLContext],
    canary: Canary,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca, context = tls
    realm = f"http://127.0.0.1:{canary.port}/token"
    hostile = Hostile(challenge=f'Bearer realm="{realm}",service="x"')
    url = await serve(aiohttp_server, hostile, context)
    client = await make_mirror(url=url, ca_file=ca.cert, username=USER, password=PASSWORD)
    name = url.removeprefix("https://")

    message = await refused(client, KINDS["manifest"], name, f"127.0.0.1:{canary.port}")

    assert "realm" in message
    assert canary.connections == 0
    assert sample(client, "mirror_upstream_realms_refused_total", upstream=name) == 1
    no_secret_logged(caplog)


@dataclass
class TokenService:
    """A token service that records the Authorization it is sent."""

    token: str
    seen: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"token": self.token, "expires_in": 300})


async def test_realm_on_another_host_gets_the_credentials_only_when_listed(
    aiohttp_server: Any, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    tokens = TokenService("issued-token-x1")
    token_server: TestServer = await aiohttp_server(tokens.app())
    # localhost is another host than the upstream's 127.0.0.1, though on the same machine.
    realm = f"http://localhost:{token_server.port}/token"
    hostile = Hostile(challenge=f'Bearer realm="{realm}",service="x"', token=tokens.token)
    hostile.content.add_image(REPO, "v1", [b"layer"])
    url = await serve(aiohttp_server, hostile)
    name = url.removeprefix("http://")

    client = await make_mirror(url=url, username=USER, password=PASSWORD)
    await refused(client, KINDS["manifest"], name, f"localhost:{token_server.port}", "auth_hosts")
    assert tokens.seen == []
    assert sample(client, "mirror_upstream_realms_refused_total", upstream=name) == 1
    await client.close()

    listed = await make_mirror(
        url=url, username=USER, password=PASSWORD, auth_hosts=(f"localhost:{token_server.port}",)
    )
    resp = await listed.get(KINDS["manifest"])
    assert resp.status == 200, await resp.text()
    assert tokens.seen == [BASIC]


async def test_token_service_redirecting_off_the_realm_hosts_is_refused(
    aiohttp_server: Any, make_mirror: MakeMirror, canary: Canary
) -> None:
    token_app = web.Application()

    async def bounce(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": f"http://localhost:{canary.port}/"})

    token_app.router.add_get("/token", bounce)
    token_server: TestServer = await aiohttp_server(token_app)
    hostile = Hostile(challenge=f'Bearer realm="http://127.0.0.1:{token_server.port}/token"')
    url = await serve(aiohttp_server, hostile)
    client = await make_mirror(url=url, username=USER, password=PASSWORD)

    await refused(client, KINDS["manifest"], f"localhost:{canary.port}")
    assert canary.connections == 0


async def test_a_realm_holding_a_user_name_is_refused(
    aiohttp_server: Any, make_mirror: MakeMirror, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = TokenService("issued-token-x1")
    token_server: TestServer = await aiohttp_server(tokens.app())
    realm = f"http://someone:s3cret-w0rd@127.0.0.1:{token_server.port}/token"
    hostile = Hostile(challenge=f'Bearer realm="{realm}",service="x"', token=tokens.token)
    name = (await serve(aiohttp_server, hostile)).removeprefix("http://")
    client = await make_mirror(url=hostile.url)

    message = await refused(client, KINDS["manifest"], name, "user name or password")

    assert tokens.seen == []
    assert sample(client, "mirror_upstream_realms_refused_total", upstream=name) == 1
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "s3cret-w0rd" not in message + logged and "someone" not in message + logged


async def test_token_fetches_are_counted_under_the_upstream_name(
    aiohttp_server: Any, make_mirror: MakeMirror
) -> None:
    """However many realms the upstream names on its host (here, on as many ports), its
    token fetches are one series per status under its own name, not one per realm."""
    hostile = Hostile(token="never-issued")  # every request refused: a new realm each time
    name = (await serve(aiohttp_server, hostile)).removeprefix("http://")
    client = await make_mirror(url=hostile.url)

    for _ in range(4):
        token_server: TestServer = await aiohttp_server(TokenService("issued-x1").app())
        realm = f"http://127.0.0.1:{token_server.port}/token"
        hostile.challenge = f'Bearer realm="{realm}",service="x"'
        assert (await client.get(KINDS["manifest"])).status == 401

    (family,) = [
        metric
        for metric in client.app[metrics_key].registry.collect()
        if metric.name == "mirror_upstream_token_fetches"
    ]
    counted = {
        (sample.labels["upstream"], sample.labels["status"], sample.value)
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert counted == {(name, "200", 4)}


def test_the_default_realm_hosts() -> None:
    assert UpstreamConfig().realm_hosts == ("auth.docker.io",)
    assert UpstreamConfig(url="https://ghcr.io").realm_hosts == ()
    assert UpstreamConfig(url="https://quay.io", auth_hosts=("a.example",)).realm_hosts == (
        "a.example",
    )


@pytest.mark.parametrize("section", ["upstream", "upstreams.private"])
def test_credentials_in_an_upstream_url_are_refused_at_load_unshown(section: str) -> None:
    entry = {"url": f"https://{USER}:{PASSWORD}@registry.example"}
    raw: dict[str, Any] = {"upstream": entry}
    if section != "upstream":
        raw = {"upstreams": {"private": entry}}
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(raw)
    assert caught.value.key == f"{section}.url"
    assert PASSWORD not in str(caught.value)
    with pytest.raises(ConfigError) as flag:
        apply_overrides(config_from_mapping({}), upstream=entry["url"])
    assert flag.value.key == "--upstream" and PASSWORD not in str(flag.value)


@pytest.mark.parametrize("key", ["auth_hosts", "redirect_hosts"])
@pytest.mark.parametrize(
    "value", [["https://cdn.example"], ["cdn.example/path"], ["u@cdn.example"], [""], [5],
              ["cdn.example:0"], ["cdn.example:99999"], "cdn.example"],
)  # fmt: skip
def test_host_lists_are_checked_at_load(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"upstreams": {"ghcr.io": {"url": "https://ghcr.io", key: value}}})
    assert caught.value.key == f"upstreams.ghcr.io.{key}"


def test_host_lists_are_read() -> None:
    raw = {"url": "https://ghcr.io", "auth_hosts": ["Auth.Example"], "redirect_hosts": ["[::1]:9"]}
    got = config_from_mapping({"upstream": raw}).upstream
    assert (got.auth_hosts, got.redirect_hosts) == (("auth.example",), ("[::1]:9",))


# --- item 3: redirects only to the own host, listed hosts, or public addresses -------------


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    """The resolver behind every public-only session: names resolve as the test says."""
    fake = FakeResolver({})
    monkeypatch.setattr(addresses, "DefaultResolver", lambda: fake)
    return fake


@pytest.mark.parametrize("address", ["127.0.0.1", "169.254.169.254", "10.0.0.1", "::1"])
@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_redirect_to_a_name_on_a_private_address_is_refused(
    aiohttp_server: Any,
    make_mirror: MakeMirror,
    canary: Canary,
    resolver: FakeResolver,
    tmp_path: Path,
    address: str,
    kind: str,
) -> None:
    resolver.answers["metadata.internal"] = [address]
    target = f"metadata.internal:{canary.port}"
    hostile = Hostile(location=f"https://{target}/latest/meta-data/", anonymous=True)
    url = await serve(aiohttp_server, hostile)
    client = await make_mirror(url=url)
    name = url.removeprefix("http://")

    await refused(client, KINDS[kind], name, target, "public")

    assert resolver.lookups >= 1  # asked, and refused before any connection
    assert canary.connections == 0
    assert sample(client, "mirror_upstream_redirects_refused_total", upstream=name) >= 1
    assert stored_files(tmp_path / "data") == []


@pytest.mark.parametrize(
    "target", ["10.0.0.1", "169.254.169.254", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0"]
)
async def test_redirect_to_a_private_address_literal_is_refused(
    aiohttp_server: Any, make_mirror: MakeMirror, canary: Canary, tmp_path: Path, target: str
) -> None:
    hostile = Hostile(location=f"https://{target}:{canary.port}/x", anonymous=True)
    url = await serve(aiohttp_server, hostile)
    client = await make_mirror(url=url)

    await refused(client, KINDS["blob"], url.removeprefix("http://"), f"{target}:{canary.port}")
    assert canary.connections == 0
    assert stored_files(tmp_path / "data") == []


async def test_plain_http_redirect_to_another_host_is_followed_only_when_listed(
    aiohttp_server: Any, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    data = b"layer bytes from the cdn"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    asked: list[str] = []
    cdn_app = web.Application()

    async def blob(request: web.Request) -> web.Response:
        asked.append(request.headers.get("Authorization", ""))
        return web.Response(body=data)

    cdn_app.router.add_get("/blob", blob)
    cdn: TestServer = await aiohttp_server(cdn_app)
    hostile = Hostile(location=f"http://localhost:{cdn.port}/blob")
    url = await serve(aiohttp_server, hostile)
    path = f"/v2/{REPO}/blobs/{digest}"

    client = await make_mirror(url=url, username=USER, password=PASSWORD)
    await refused(client, path, url.removeprefix("http://"), f"localhost:{cdn.port}")
    assert asked == []
    await client.close()

    listed = await make_mirror(
        url=url, username=USER, password=PASSWORD, redirect_hosts=(f"localhost:{cdn.port}",)
    )
    resp = await listed.get(path)
    assert resp.status == 200 and await resp.read() == data
    assert asked == [""]  # followed, without the upstream's Authorization


async def test_manifest_redirect_to_its_own_host_on_another_port_is_followed(
    aiohttp_server: Any, make_mirror: MakeMirror
) -> None:
    """registry.k8s.io sends every API call elsewhere: a manifest redirect is followed."""
    backend = Hostile(anonymous=True)
    backend.content.add_image(REPO, "v1", [b"layer"])
    await serve(aiohttp_server, backend)
    front = Hostile(location=f"{backend.url}{KINDS['manifest']}")
    url = await serve(aiohttp_server, front)
    client = await make_mirror(url=url, username=USER, password=PASSWORD)

    resp = await client.get(KINDS["manifest"])
    assert resp.status == 200, await resp.text()
    # Another port of its host is another origin: the account's Basic is not sent there
    # (the tag's HEAD, then its GET).
    assert backend.authorizations == ["", ""]


# --- the resolver and the connector, alone ----------------------------------------------------


@pytest.mark.parametrize(
    "address, public",
    [("10.0.0.1", False), ("169.254.169.254", False), ("::1", False), ("93.184.216.34", True),
     ("127.0.0.1", False), ("fd00::1", False), ("fe80::1", False), ("0.0.0.0", False),
     ("224.0.0.1", False), ("240.0.0.1", False), ("100.64.0.1", False), ("::ffff:10.0.0.1", False),
     ("2002:a00:1::", False), ("2606:4700::1111", True), ("192.168.1.1", False)],
)  # fmt: skip
def test_public_addresses(address: str, public: bool) -> None:
    parsed = literal_address(address)
    assert parsed is not None and is_public(parsed) is public


@pytest.mark.parametrize(
    "answers", [["10.0.0.1"], ["169.254.169.254"], ["::1"], ["93.184.216.34", "10.0.0.1"], []]
)
async def test_the_resolver_refuses_any_private_answer(answers: list[str]) -> None:
    resolver = PublicResolver(FakeResolver({"cdn.example": answers}))
    with pytest.raises(AddressRefused):
        await resolver.resolve("cdn.example", 443)


async def test_the_connector_connects_to_the_address_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The address the connection is opened to is the one the resolver checked, and a
    second answer (DNS rebinding) is checked again rather than taken on trust."""
    tried: list[str] = []

    async def start_connection(addr_infos: Any, **kwargs: Any) -> Any:
        tried.extend(info[4][0] for info in addr_infos)
        raise OSError("no route in tests")

    monkeypatch.setattr(aiohttp.connector.aiohappyeyeballs, "start_connection", start_connection)
    fake = FakeResolver({"cdn.example": ["93.184.216.34"]})
    connector = aiohttp.TCPConnector(resolver=PublicResolver(fake), use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.get("https://cdn.example/blob")
        assert tried == ["93.184.216.34"]

        fake.answers["cdn.example"] = ["127.0.0.1"]  # the second answer swaps in loopback
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get("https://cdn.example/blob")
        assert isinstance(caught.value.os_error, AddressRefused)
        assert tried == ["93.184.216.34"]  # no connection to 127.0.0.1


# --- replicas: no redirects, no owner URL of another form -------------------------------------


async def test_an_owner_redirect_is_not_followed(aiohttp_server: Any) -> None:
    followed: list[str] = []
    app = web.Application()

    async def owner(request: web.Request) -> web.Response:
        if request.path.startswith("/elsewhere"):
            followed.append(request.path)
            return web.Response(status=206, body=b"x", headers={"Content-Range": "bytes 0-0/1"})
        return web.Response(status=307, headers={"Location": "/elsewhere"})

    app.router.add_get("/{tail:.*}", owner)
    server: TestServer = await aiohttp_server(app)
    owner_url = f"http://127.0.0.1:{server.port}"
    peers = PeerClient(b"s" * 32, Metrics().cluster, 2, 5, advertise_url="http://127.0.0.1:8083")
    try:
        with pytest.raises(PeerUnavailable):
            await peers.open_blob(owner_url, parse_digest(DIGEST), 0)
    finally:
        await peers.close()
    assert followed == []


@pytest.mark.parametrize("lies", [False, True], ids=["declared", "streamed"])
async def test_a_peer_is_held_to_max_blob_size(aiohttp_server: Any, lies: bool) -> None:
    """An owner (whatever an owner URL in Redis names) saying or sending more than
    storage.max_blob_size: refused before a byte is read, or cut at the first byte too
    many, counted, and the pull failing as for an upstream's oversized blob."""
    limit = 64 * 1024

    async def owner(request: web.Request) -> web.StreamResponse:
        # Streamed: no size said (as an owner says while its own download has none yet).
        span = "bytes 0-*/*" if lies else f"bytes 0-{10 * limit - 1}/{10 * limit}"
        resp = web.StreamResponse(status=206, headers={"Content-Range": span})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"x" * limit)
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", owner)
    server: TestServer = await aiohttp_server(app)
    metrics = Metrics()
    peers = PeerClient(
        b"s" * 32, metrics.cluster, 2, 5,
        advertise_url="http://127.0.0.1:8083", max_blob_size=limit,
    )  # fmt: skip
    received = 0
    try:
        with pytest.raises(BlobTooLarge, match="larger than storage.max_blob_size"):
            body = await peers.open_blob(f"http://127.0.0.1:{server.port}", parse_digest(DIGEST), 0)
            async with body:
                async for chunk in body.chunks():
                    received += len(chunk)
    finally:
        await peers.close()
    assert received <= limit
    assert metrics.registry.get_sample_value("mirror_cluster_peer_blob_too_large_total") == 1


async def test_a_peer_is_held_to_the_length_it_gives(aiohttp_server: Any) -> None:
    """An owner saying `bytes 0-99/100` and streaming on: cut at the 100th byte, the
    bytes past it never handed to the download (nor to its clients)."""

    async def owner(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=206, headers={"Content-Range": "bytes 0-99/100"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"x" * 65536)
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", owner)
    server: TestServer = await aiohttp_server(app)
    peers = PeerClient(b"s" * 32, Metrics().cluster, 2, 5, advertise_url="http://127.0.0.1:8083")
    received = 0
    try:
        with pytest.raises(TooLong, match="more than the 100 bytes"):
            body = await peers.open_blob(f"http://127.0.0.1:{server.port}", parse_digest(DIGEST), 0)
            async with body:
                async for chunk in body.chunks():
                    received += len(chunk)
    finally:
        await peers.close()
    assert received <= 100


@pytest.mark.parametrize(
    "owner",
    ["https://127.0.0.1:{port}", "http://127.0.0.1", "http://127.0.0.1:{port}/x",
     "http://u:p@127.0.0.1:{port}", "http://127.0.0.1:{port}/?", "ftp://127.0.0.1:{port}"],
)  # fmt: skip
async def test_an_owner_url_of_another_form_is_not_asked(canary: Canary, owner: str) -> None:
    metrics = Metrics()
    peers = PeerClient(b"s" * 32, metrics.cluster, 2, 5, advertise_url="http://10.0.0.5:8083")
    try:
        with pytest.raises(PeerRefused):
            await peers.open_blob(owner.format(port=canary.port), parse_digest(DIGEST), 0)
    finally:
        await peers.close()
    assert canary.connections == 0
    assert metrics.registry.get_sample_value("mirror_cluster_owners_refused_total") == 1


class HeldByRedis:
    """A Redis client stub: the lease is always held, by `owner`."""

    def __init__(self, owner: str) -> None:
        self.owner = owner

    async def set(self, *args: Any, **kwargs: Any) -> bool:
        return False

    async def get(self, key: str) -> bytes:
        return f"{self.owner} 0123".encode()


async def test_a_refused_owner_means_fetching_here_at_once(canary: Canary) -> None:
    metrics = Metrics()
    leases = Leases(HeldByRedis(f"https://127.0.0.1:{canary.port}"), "http://10.0.0.5:8083", 10)  # type: ignore[arg-type]
    peers = PeerClient(b"s" * 32, metrics.cluster, 2, 5, advertise_url="http://10.0.0.5:8083")
    try:
        flight = BlobFlight(leases, peers, metrics.cluster)
        got = await asyncio.wait_for(flight.source(parse_digest(DIGEST), 0, None), 5)
    finally:
        await peers.close()
    assert got is None and canary.connections == 0
