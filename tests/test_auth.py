"""Upstream auth: parsing challenges, and the Bearer token flow against the fake hub."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from mirror.cluster.shared import SharedWork
from mirror.cluster.tokenshare import SharedTokens
from mirror.config import CacheConfig, UpstreamConfig
from mirror.metadata.redis import RedisMetadata
from mirror.metadata.store import TOKEN_PREFIX
from mirror.observe.metrics import Metrics
from mirror.upstream.tokens import Challenge, TokenCache, basic_authorization, parse_challenge
from tests.conftest import MakeClient
from tests.fakehub import DOCKER_MANIFEST, FakeHub
from tests.services import RedisServer

Client = TestClient[Any, Any]
PASSWORD = "wr0ng-Pa55word-never-shown"
MiB = 1024 * 1024


def add_images(hub: FakeHub, repo: str, *tags: str) -> None:
    for tag in tags:
        hub.content.add_image(repo, tag, [f"{repo}:{tag}".encode()])


async def get_manifest(client: Client, repo: str, ref: str) -> None:
    resp = await client.get(f"/v2/{repo}/manifests/{ref}")
    assert resp.status == 200, await resp.text()
    await resp.read()


# --- parse_challenge ------------------------------------------------------------------------


async def test_parse_docker_hub_challenge() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/nginx:pull"'
    )
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.docker.io/token"
    assert challenge.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/nginx:pull",
    }


async def test_parse_comma_inside_quotes() -> None:
    challenge = parse_challenge('Bearer realm="https://r/token",scope="repository:a:pull,push"')
    assert challenge.params["scope"] == "repository:a:pull,push"
    assert challenge.realm == "https://r/token"


async def test_parse_several_scopes_in_one_value() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://r/token",service="s",'
        'scope="repository:a:pull repository:b/c:pull,push"'
    )
    assert challenge.params["scope"].split(" ") == [
        "repository:a:pull",
        "repository:b/c:pull,push",
    ]
    assert challenge.params["service"] == "s"


async def test_parse_escaped_quotes() -> None:
    challenge = parse_challenge(r'Bearer realm="https://r/token",error="say \"no\", twice"')
    assert challenge.params["error"] == 'say "no", twice'
    assert challenge.realm == "https://r/token"


async def test_parse_unquoted_values() -> None:
    challenge = parse_challenge("Bearer realm=https://r/token,service=registry.example")
    assert challenge.params == {"realm": "https://r/token", "service": "registry.example"}


async def test_parse_basic_challenge() -> None:
    challenge = parse_challenge('Basic realm="x"')
    assert challenge.scheme == "basic"
    assert challenge.realm == "x"


async def test_parse_extra_whitespace() -> None:
    challenge = parse_challenge(
        '  Bearer   realm = "https://r/token" ,  service= "s" ,scope ="a"  '
    )
    assert challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://r/token", "service": "s", "scope": "a"}


async def test_parse_scheme_and_keys_case_insensitive() -> None:
    challenge = parse_challenge('BEARER Realm="https://r/token",SERVICE="s"')
    assert challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://r/token", "service": "s"}


# --- tokens against the fake hub ------------------------------------------------------------


async def test_one_token_for_many_requests_to_one_repo(hub: FakeHub, client: Client) -> None:
    add_images(hub, "library/nginx", "1.27", "1.28")
    await get_manifest(client, "library/nginx", "1.27")
    await get_manifest(client, "library/nginx", "1.28")
    assert hub.stats["manifest_get"] == 2  # both went upstream...
    assert hub.stats["token"] == 1  # ...with one token
    assert hub.stats["unauthorized"] == 1


async def test_second_repo_costs_one_token_and_no_401(hub: FakeHub, client: Client) -> None:
    add_images(hub, "library/nginx", "latest")
    add_images(hub, "library/redis", "latest")
    await get_manifest(client, "library/nginx", "latest")
    assert (hub.stats["token"], hub.stats["unauthorized"]) == (1, 1)
    await get_manifest(client, "library/redis", "latest")
    assert hub.stats["token"] == 2
    assert hub.stats["unauthorized"] == 1  # the realm was known: token fetched before asking


async def test_concurrent_requests_share_one_token(hub: FakeHub, client: Client) -> None:
    tags = [f"v{i}" for i in range(5)]
    add_images(hub, "library/nginx", "latest", *tags)
    await get_manifest(client, "library/nginx", "latest")  # learn the realm
    hub.reset_stats()
    add_images(hub, "library/alpine", *tags)
    await asyncio.gather(*(get_manifest(client, "library/alpine", tag) for tag in tags))
    assert hub.stats["token"] == 1
    assert hub.stats["unauthorized"] == 0


async def test_cancelled_request_fails_no_one_sharing_its_token_fetch(hub: FakeHub) -> None:
    """The token fetch belongs to no request: the one that started it may be cancelled
    (shutdown, a timeout) while others wait for the same token."""
    async with aiohttp.ClientSession() as session:
        tokens = TokenCache(session, Metrics())
        challenge = Challenge("bearer", {"realm": hub.token_url + "/token", "service": "hub"})
        scopes = ["repository:library/alpine:pull"]
        hub.token_delay = 0.3
        first = asyncio.create_task(tokens.get(challenge, scopes, None))
        second = asyncio.create_task(tokens.get(challenge, scopes, None))
        for _ in range(100):
            if hub.stats["token"]:
                break
            await asyncio.sleep(0.01)

        first.cancel()

        assert await second  # the token, not the first request's cancellation
        assert first.cancelled()
        assert hub.stats["token"] == 1
        await tokens.close()


async def test_token_is_kept_per_account(hub: FakeHub) -> None:
    async with aiohttp.ClientSession() as session:
        tokens = TokenCache(session, Metrics())
        challenge = Challenge("bearer", {"realm": hub.token_url + "/token", "service": "hub"})
        scopes = ["repository:team/private:pull"]

        anonymous = await tokens.get(challenge, scopes, None)
        with_account = await tokens.get(challenge, scopes, basic_authorization("me", "pw"))

        assert anonymous != with_account
        assert hub.stats["token"] == 2
        assert hub.stats.token_users == ["me"]
        await tokens.close()


async def test_expired_token_is_refetched(hub: FakeHub, client: Client) -> None:
    hub.token_expires_in = 2  # cached for 2 - min(30, 2/5) = 1.6 s
    add_images(hub, "library/nginx", "a", "b", "c")
    await get_manifest(client, "library/nginx", "a")
    await get_manifest(client, "library/nginx", "b")
    assert hub.stats["token"] == 1
    await asyncio.sleep(1.8)
    await get_manifest(client, "library/nginx", "c")
    assert hub.stats["token"] == 2
    assert hub.stats["unauthorized"] == 1  # refreshed before it lapsed, not after a 401


async def test_a_token_refused_before_its_expiry_is_fetched_again_once(
    hub: FakeHub, client: Client
) -> None:
    add_images(hub, "library/nginx", "a", "b", "c")
    await get_manifest(client, "library/nginx", "a")
    hub.revoke_tokens()

    await asyncio.gather(*(get_manifest(client, "library/nginx", tag) for tag in "bc"))

    assert hub.stats["token"] == 2
    assert hub.stats["unauthorized"] == 3  # the first request, then the two refused at once


async def test_upstream_account_sent_as_basic_auth(hub: FakeHub, make_client: MakeClient) -> None:
    add_images(hub, "library/nginx", "latest")
    client = await make_client(
        upstream=UpstreamConfig(url=hub.registry_url, username="u", password="p")
    )
    await get_manifest(client, "library/nginx", "latest")
    assert hub.stats["token_basic"] == 1
    assert hub.stats.token_users == ["u"]


async def test_anonymous_token_has_no_basic_auth(hub: FakeHub, client: Client) -> None:
    add_images(hub, "library/nginx", "latest")
    await get_manifest(client, "library/nginx", "latest")
    assert hub.stats["token"] == 1
    assert hub.stats["token_basic"] == 0


async def test_wrong_password_is_403_denied_without_echo(
    hub: FakeHub, make_client: MakeClient
) -> None:
    hub.users = {"u": "right"}
    add_images(hub, "library/nginx", "latest")
    client = await make_client(
        upstream=UpstreamConfig(url=hub.registry_url, username="u", password=PASSWORD)
    )
    resp = await client.get("/v2/library/nginx/manifests/latest")
    body = await resp.text()
    assert resp.status == 403
    assert (await resp.json())["errors"][0]["code"] == "DENIED"
    assert PASSWORD not in body
    assert PASSWORD not in str(resp.headers)
    assert hub.stats.token_users == ["u"]


# --- a token service that answers what it likes ---------------------------------------------


TokenAnswer = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def behind_token_service(
    aiohttp_server: Any, make_client: MakeClient, answer: TokenAnswer
) -> Client:
    """A mirror in front of a registry whose token service (another port) answers `answer`;
    the registry serves an empty schema 2 manifest to the token `good`."""
    tokens = web.Application()
    tokens.router.add_get("/token", answer)
    realm = str((await aiohttp_server(tokens)).make_url("/token"))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "layers": []})

    async def api(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer good":
            challenge = f'Bearer realm="{realm}",service="registry.test"'
            return web.json_response({}, status=401, headers={"WWW-Authenticate": challenge})
        return web.Response(text=manifest, content_type=DOCKER_MANIFEST)

    registry = web.Application()
    registry.router.add_route("*", "/v2/{rest:.*}", api)
    url = str((await aiohttp_server(registry)).make_url("")).rstrip("/")
    return await make_client(upstream=UpstreamConfig(url=url))


async def test_a_token_answer_past_64_kib_is_refused_unread(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"token": "good", "padding": "')
        for _ in range(64):  # 64 MiB, unless the mirror hangs up first
            await resp.write(b"x" * MiB)
            sent += MiB
        await resp.write(b'"}')
        return resp

    client = await behind_token_service(aiohttp_server, make_client, endless)

    resp = await client.get("/v2/team/app/manifests/v1")

    assert resp.status == 503
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert sent < 16 * MiB  # what the sockets' buffers took before the mirror hung up


async def test_a_token_answer_nested_too_deep_is_503(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    async def nested(request: web.Request) -> web.Response:
        return web.Response(body=b"[" * 60_000, content_type="application/json")

    client = await behind_token_service(aiohttp_server, make_client, nested)

    resp = await client.get("/v2/team/app/manifests/v1")

    assert resp.status == 503
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("expires_in", "kept_for"),
    [(float("inf"), 48), (float("nan"), 48), (True, 48), (10**9, 3570), (300, 270)],
)
async def test_a_token_is_shared_for_at_most_an_hour(
    hub: FakeHub, redis_server: RedisServer, expires_in: Any, kept_for: float
) -> None:
    """Whatever `expires_in` says (JSON may say Infinity, NaN or 1e400), the token is
    kept for a finite time up to an hour, here and in the store shared with other processes
    (60 s when it is no number, as the spec says; both less the margin)."""
    hub.token_expires_in = expires_in
    keys = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    await keys.flushdb()
    store = RedisMetadata(redis_server.url, ttl=600)
    async with aiohttp.ClientSession() as session:
        tokens = TokenCache(
            session, Metrics(), SharedTokens(store, SharedWork(None, Metrics().cluster))
        )
        challenge = Challenge("bearer", {"realm": f"{hub.token_url}/token", "service": "x"})
        token = await tokens.get(challenge, ["repository:library/a:pull"], None)
        await tokens.close()
    (key,) = await keys.keys(TOKEN_PREFIX + "*")
    stored = await store.get_token(key.removeprefix(TOKEN_PREFIX))
    await store.close()
    await keys.aclose()

    assert stored is not None and stored[0] == token
    assert stored[1] - time.time() == pytest.approx(kept_for, abs=2)


async def test_a_refused_token_in_the_shared_store_is_not_taken_again(
    hub: FakeHub, redis_server: RedisServer
) -> None:
    """Two processes share tokens; the registry refuses the shared one before it expires:
    the process it was refused to fetches its own, not the shared one again."""
    keys = aioredis.Redis.from_url(redis_server.url)
    await keys.flushdb()
    await keys.aclose()
    store = RedisMetadata(redis_server.url, ttl=600)
    challenge = Challenge("bearer", {"realm": f"{hub.token_url}/token", "service": "x"})
    scopes = ["repository:library/a:pull"]
    async with aiohttp.ClientSession() as session:
        first, second = (
            TokenCache(session, Metrics(), SharedTokens(store, SharedWork(None, Metrics().cluster)))
            for _ in range(2)
        )
        shared = await first.get(challenge, scopes, None)
        assert await second.get(challenge, scopes, None) == shared
        hub.revoke_tokens()

        fresh = await second.get(challenge, scopes, None, refused=shared)

        assert fresh != shared
        assert await second.get(challenge, scopes, None) == fresh
        assert hub.stats["token"] == 2
        for tokens in (first, second):
            await tokens.close()
    await store.close()


# --- a challenge that cannot be answered fails its request alone ---------------------------


class MovingRegistry:
    """A registry that serves an empty schema 2 manifest to `Bearer <accepted>` and
    challenges with `challenge` otherwise (the test moves its realm); `asked` counts API
    requests, `injected` those with an X-Injected header."""

    def __init__(self, challenge: str) -> None:
        self.challenge = challenge
        self.accepted = "good"
        self.asked = self.injected = 0

    async def api(self, request: web.Request) -> web.Response:
        self.asked += 1
        self.injected += "X-Injected" in request.headers
        if request.headers.get("Authorization") != f"Bearer {self.accepted}":
            headers = {"WWW-Authenticate": self.challenge}
            return web.json_response({}, status=401, headers=headers)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "layers": []})
        return web.Response(text=manifest, content_type=DOCKER_MANIFEST)


class TokenRealm:
    """A token service on its own port giving `token`, or answering `status`; `asked`
    counts the requests it had."""

    def __init__(self) -> None:
        self.status = 200
        self.token = "good"
        self.realm = ""
        self.asked = 0

    async def start(self, aiohttp_server: Any) -> TokenRealm:
        app = web.Application()
        app.router.add_get("/token", self._answer)
        self.realm = str((await aiohttp_server(app)).make_url("/token"))
        return self

    def challenge(self) -> str:
        return f'Bearer realm="{self.realm}",service="registry.test"'

    async def _answer(self, request: web.Request) -> web.Response:
        self.asked += 1
        if self.status != 200:
            return web.json_response({}, status=self.status)
        return web.json_response({"token": self.token, "expires_in": 300})


async def mirror_of(
    aiohttp_server: Any, make_client: MakeClient, registry: MovingRegistry, **changes: Any
) -> Client:
    app = web.Application()
    app.router.add_route("*", "/v2/{rest:.*}", registry.api)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    upstream = UpstreamConfig(url=url, connect_timeout=2, read_timeout=5)
    return await make_client(upstream=upstream, **changes)


async def test_a_challenge_without_a_realm_fails_its_request_alone(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    """A proxy in front answers one 401 whose Bearer challenge names no realm: that request
    fails with an OCI error, and the next one (the registry itself again) is asked and
    answered, not refused without asking because of the challenge remembered."""
    tokens = await TokenRealm().start(aiohttp_server)
    registry = MovingRegistry('Bearer error="invalid_token"')
    client = await mirror_of(aiohttp_server, make_client, registry)

    resp = await client.get("/v2/team/app/manifests/v1")
    assert resp.status == 503
    error = (await resp.json())["errors"][0]
    assert error["code"] == "UNAVAILABLE" and "without a realm" in error["message"]

    registry.challenge = tokens.challenge()
    asked = registry.asked
    await get_manifest(client, "team/app", "v2")
    # The 401 that named the realm, then the tag's HEAD answered and its digest's GET.
    assert registry.asked == asked + 3


async def test_a_realm_whose_token_service_fails_is_learnt_again(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    """The realm learnt gives tokens, then fails for good while the registry names another:
    the request that found it failing fails, the next learns the new realm from a 401."""
    old, new = [await TokenRealm().start(aiohttp_server) for _ in range(2)]
    registry = MovingRegistry(old.challenge())
    client = await mirror_of(aiohttp_server, make_client, registry)
    await get_manifest(client, "team/app", "v1")
    old.status = 500
    registry.challenge = new.challenge()

    resp = await client.get("/v2/team/other/manifests/v1")  # a new scope: asked at the old realm
    assert resp.status == 503

    await get_manifest(client, "team/other", "v1")


# --- a token is only ever a token -----------------------------------------------------------


NOT_TOKENS = {
    "crlf": "good\r\nX-Injected: 1",
    "space": "good token",
    "non-ascii": "g\u00f6od",
    "padding inside": "go=od",
    "too long": "a" * (16 * 1024 + 1),
}


@pytest.mark.parametrize("token", NOT_TOKENS.values(), ids=NOT_TOKENS.keys())
async def test_a_token_that_is_no_b64token_is_refused_and_never_kept(
    aiohttp_server: Any, make_client: MakeClient, token: str
) -> None:
    """The token goes into a header: one that could split it (CR LF) or is no token is an
    upstream failure (503, not a 500 of ours), and is asked for again next time."""
    tokens = await TokenRealm().start(aiohttp_server)
    tokens.token = token
    registry = MovingRegistry(tokens.challenge())
    client = await mirror_of(aiohttp_server, make_client, registry)

    for asked in (1, 2):
        resp = await client.get("/v2/team/app/manifests/v1")
        assert resp.status == 503
        assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
        assert tokens.asked == asked
    assert registry.injected == 0


async def test_an_expired_tag_is_served_stale_when_the_new_token_is_no_token(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    tokens = await TokenRealm().start(aiohttp_server)
    registry = MovingRegistry(tokens.challenge())
    client = await mirror_of(aiohttp_server, make_client, registry, cache=CacheConfig(tag_ttl=0))
    await get_manifest(client, "team/app", "v1")
    registry.accepted = "rotated"  # the kept token is refused: a new one is fetched
    tokens.token = "rotated\r\nX-Injected: 1"

    resp = await client.get("/v2/team/app/manifests/v1")

    assert resp.status == 200, await resp.text()
    assert resp.headers["Warning"] == '110 - "Response is Stale"'
    assert registry.injected == 0
