"""Pull policies in a running mirror: 403s before any upstream request, rules per user,
group and anonymous client, the narrowed token, the denial metric and the audit lines.

Two fake hubs on real ports play docker.io (the default upstream) and ghcr.io; each counts
every request it gets, so "no upstream request" is checked on the upstream itself.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp.test_utils import TestClient

from mirror.access.clienttokens import TokenSigner
from mirror.config import Config, config_from_mapping
from mirror.observe.logs import setup_logging
from tests.conftest import MakeClient
from tests.fakehub import DOCKER_MANIFEST, FakeHub

Client = TestClient[Any, Any]
PASSWORDS = {"alice": "alice-Pa55-1", "bob": "bob-Pa55-2", "carol": "carol-Pa55-3"}


def basic(user: str) -> dict[str, str]:
    raw = f"{user}:{PASSWORDS[user]}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


@pytest.fixture
async def ghcr() -> AsyncIterator[FakeHub]:
    async with FakeHub() as fake:
        yield fake


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text(
        "".join(
            f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
            for user, pw in PASSWORDS.items()
        )
    )
    return path


@pytest.fixture
def images(hub: FakeHub, ghcr: FakeHub) -> dict[str, dict[str, Any]]:
    return {
        "busybox": hub.content.add_image("library/busybox", "latest", [b"busybox layer"]),
        "rc": hub.content.add_image("library/busybox", "latest-rc1", [b"rc layer"]),
        "nginx": hub.content.add_image("library/nginx", "latest", [b"nginx layer"]),
        "someone": hub.content.add_image("someone/app", "v1", [b"someone's layer"]),
        "team": ghcr.content.add_image("team/app", "v1", [b"team layer"]),
    }


async def policy_mirror(make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, **raw: Any) -> Client:
    """A mirror of docker.io (the default) and ghcr.io whose policy comes from `raw`,
    parsed as the config file would be."""
    hub_entry = {"url": hub.registry_url, **raw.pop("docker_io", {})}
    document = {
        "upstreams": {"docker.io": hub_entry, "ghcr.io": {"url": ghcr.registry_url}},
        **raw,
    }
    parsed = config_from_mapping(document)
    return await make_client(
        upstream=parsed.upstream, upstreams=parsed.upstreams, auth=parsed.auth,
        policy=parsed.policy,
    )  # fmt: skip


def error(body: bytes) -> dict[str, Any]:
    errors = json.loads(body)["errors"]
    assert len(errors) == 1, errors
    entry: dict[str, Any] = errors[0]
    return entry


async def status_of(client: Client, path: str, method: str = "GET", **headers: str) -> int:
    resp = await client.request(method, path, headers=headers)
    await resp.read()
    return resp.status


async def denied_counts(client: Client) -> dict[tuple[str, str], float]:
    text = await (await client.get("/metrics")).text()
    found = re.findall(
        r'^mirror_pulls_denied_total\{reason="(\w+)",upstream="([^"]+)"\} (\S+)$', text, re.M
    )
    return {(upstream, reason): float(value) for reason, upstream, value in found}


# --- upstream allow/deny lists -----------------------------------------------------------------

LISTS = {"allow": ["library/*", "bitnami/**"], "deny": ["library/*:latest-rc*"]}


async def test_a_denied_pull_is_a_403_naming_the_repository_and_asks_nothing_upstream(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, images: dict[str, dict[str, Any]]
) -> None:
    client = await policy_mirror(make_client, hub, ghcr, docker_io=LISTS)
    someone = images["someone"]
    for path in (
        "/v2/someone/app/manifests/v1",
        f"/v2/someone/app/manifests/{someone['digest']}",
        f"/v2/someone/app/blobs/{someone['layers'][0]}",
        "/v2/someone/app/tags/list",
        f"/v2/someone/app/referrers/{someone['digest']}",
        "/v2/library/busybox/manifests/latest-rc1",
    ):
        for method in ("GET", "HEAD"):
            if method == "HEAD" and "/manifests/" not in path and "/blobs/" not in path:
                continue
            resp = await client.request(method, path)
            body = await resp.read()
            assert resp.status == 403, (method, path, body)
            if method == "GET":
                entry = error(body)
                assert entry["code"] == "DENIED"
                name = path.split("/")[2] + "/" + path.split("/")[3]
                assert name in entry["message"] and entry["detail"]["repository"] == name
                # The rule is the operator's business, never the client's.
                assert "library/*" not in body.decode() and "latest-rc*" not in body.decode()
    assert hub.stats.requests == [] and ghcr.stats.requests == []
    counts = await denied_counts(client)
    assert counts == {("docker.io", "allow_list"): 8.0, ("docker.io", "deny_list"): 2.0}


async def test_what_the_lists_allow_is_pulled(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, images: dict[str, dict[str, Any]]
) -> None:
    client = await policy_mirror(make_client, hub, ghcr, docker_io=LISTS)
    rc = images["rc"]
    assert await status_of(client, "/v2/library/busybox/manifests/latest") == 200
    assert await status_of(client, "/v2/library/busybox/manifests/latest", "HEAD") == 200
    # A denied tag's content by digest, and its blobs: the tag part is about tags.
    assert await status_of(client, f"/v2/library/busybox/manifests/{rc['digest']}") == 200
    assert await status_of(client, f"/v2/library/busybox/blobs/{rc['layers'][0]}") == 200
    assert await status_of(client, "/v2/ghcr.io/team/app/manifests/v1") == 200  # no lists
    assert await denied_counts(client) == {}


DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
SCHEMA2_ONLY = {"Accept": DOCKER_MANIFEST}  # reads no lists: gets a list's linux/amd64 entry


def add_list(hub: FakeHub, repo: str, tag: str, image: dict[str, Any]) -> str:
    """A Docker manifest list whose linux/amd64 entry is `image`."""
    entry = {
        "mediaType": DOCKER_MANIFEST,
        "digest": image["digest"],
        "size": len(image["manifest"]),
        "platform": {"os": "linux", "architecture": "amd64"},
    }
    body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [entry]})
    return hub.content.add_manifest(repo, body.encode(), DOCKER_LIST, tag)


async def test_a_digest_deny_refuses_the_manifest_by_tag_too(
    make_client: MakeClient,
    hub: FakeHub,
    ghcr: FakeHub,
    images: dict[str, dict[str, Any]],
    log_stream: Callable[[str], io.StringIO],
) -> None:
    stream = log_stream("json")
    nginx = images["nginx"]
    bad = nginx["digest"]
    # A list naming the denied manifest, and a denied list naming an allowed one.
    add_list(hub, "library/nginx", "multi", nginx)
    good = hub.content.add_image("library/nginx", "good", [b"good layer"])
    bad_list = add_list(hub, "library/nginx", "bad-list", good)
    deny = [f"library/*@{bad}", f"library/nginx@{bad_list}"]
    client = await policy_mirror(make_client, hub, ghcr, docker_io={"deny": deny})
    refused = [
        ("latest", {}, bad),
        ("latest", {"If-None-Match": f'"{bad}"'}, bad),  # no 304 names it either
        ("multi", SCHEMA2_ONLY, bad),  # the denied manifest picked from an allowed list
        ("bad-list", SCHEMA2_ONLY, bad_list),  # an allowed one picked from a denied list
        ("bad-list", {}, bad_list),
        (bad, {}, bad),
    ]
    for reference, headers, digest in refused:
        for method in ("HEAD", "GET"):
            path = f"/v2/library/nginx/manifests/{reference}"
            resp = await client.request(method, path, headers=headers)
            body = await resp.read()
            assert resp.status == 403, (method, reference, headers, body)
            assert "Docker-Content-Digest" not in resp.headers and "ETag" not in resp.headers
            if method == "GET":  # the body a denial by digest has
                entry = error(body)
                assert entry["code"] == "DENIED"
                assert entry["message"] == (
                    f"pulling library/nginx@{digest} is not allowed by this mirror's policy"
                )
                assert entry["detail"] == {"repository": "library/nginx", "reference": digest}
    # The allowed list itself is served to a client reading lists (it only names the denied
    # manifest, refused when asked for), and the denied list's child by digest.
    resp = await client.get("/v2/library/nginx/manifests/multi", headers={"Accept": DOCKER_LIST})
    assert resp.status == 200 and resp.headers["Content-Type"] == DOCKER_LIST
    assert await status_of(client, f"/v2/library/nginx/manifests/{good['digest']}") == 200
    assert await status_of(client, "/v2/library/nginx/manifests/good") == 200
    assert await denied_counts(client) == {("docker.io", "deny_list"): 12.0}
    audit = [json.loads(line) for line in stream.getvalue().splitlines() if "mirror.audit" in line]
    first = audit[0]
    assert (first["reference"], first["digest"], first["outcome"], first["reason"]) == (
        "latest",
        bad,
        "denied",
        "deny_list",
    )
    assert first["status"] == 403


async def test_a_digest_deny_refuses_the_manifest_asked_for_by_its_sha512(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, images: dict[str, dict[str, Any]]
) -> None:
    """A deny names the sha256 digest registries show; the same bytes asked for by their
    sha512 are the same manifest, refused alike."""
    nginx = images["nginx"]
    media_type, body = hub.content.manifests["library/nginx"][nginx["digest"]]
    sha512 = "sha512:" + hashlib.sha512(body).hexdigest()
    hub.content.manifests["library/nginx"][sha512] = (media_type, body)
    client = await policy_mirror(
        make_client, hub, ghcr, docker_io={"deny": [f"library/nginx@{nginx['digest']}"]}
    )
    for method in ("GET", "HEAD", "GET"):
        path = f"/v2/library/nginx/manifests/{sha512}"
        resp = await client.request(method, path)
        await resp.read()
        assert resp.status == 403, method
        assert "Docker-Content-Digest" not in resp.headers


# --- rules: users, groups, anonymous, tokens ----------------------------------------------------

RULES = [
    {"who": ["platform"], "pull": ["**"]},
    {"who": ["bob"], "pull": ["ghcr.io/team/*"]},
    {"who": ["*"], "pull": ["docker.io/library/*"]},
    {"who": ["anonymous"], "pull": ["docker.io/library/busybox"]},
]


def auth_with(htpasswd: Path, rules: list[Any] = RULES) -> dict[str, Any]:
    return {"htpasswd": str(htpasswd), "groups": {"platform": ["alice"]}, "rules": rules}


async def test_a_tag_list_leaves_out_the_tags_its_client_may_not_pull_then_pages(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, htpasswd: Path
) -> None:
    """A refused tag's name is not told: the list holds the tags the asking client could
    pull by tag, and `n`, `last` and `Link` page through those."""
    for tag in ("internal-rc1", "latest", "nightly", "v1", "v2", "zz-nightly"):
        hub.content.add_image("library/busybox", tag, [tag.encode()])
    rules = [
        {"who": ["alice"], "pull": ["docker.io/library/**"]},
        {
            "who": ["*", "anonymous"],
            "pull": ["docker.io/library/*:v*", "docker.io/library/*:latest"],
        },
    ]
    client = await policy_mirror(
        make_client, hub, ghcr, auth=auth_with(htpasswd, rules),
        docker_io={"deny": ["library/*:internal-*"]},
    )  # fmt: skip
    path = "/v2/library/busybox/tags/list"

    async def pages(who: dict[str, str], query: str) -> list[list[str]]:
        found, url = [], f"{path}?{query}"
        while url:
            resp = await client.get(url, headers=who)
            assert resp.status == 200, await resp.text()
            found.append((await resp.json())["tags"])
            url = resp.headers.get("Link", "").partition(">")[0].removeprefix("<")
        return found

    assert await status_of(client, "/v2/library/busybox/manifests/internal-rc1") == 403
    # No rule lets anonymous clients pull it, one lets alice: they are challenged.
    assert await status_of(client, "/v2/library/busybox/manifests/nightly") == 401
    assert await pages({}, "") == [["latest", "v1", "v2"]]
    # After v2 no tag may be pulled: no Link promises another page.
    assert await pages({}, "n=1") == [["latest"], ["v1"], ["v2"]]
    assert await pages(basic("bob"), "n=2") == [["latest", "v1"], ["v2"]]
    assert await pages({}, "n=2&last=v1") == [["v2"]]
    # The list's deny is everyone's; alice's rule lets her pull every other tag.
    assert await pages(basic("alice"), "n=3") == [["latest", "nightly", "v1"], ["v2", "zz-nightly"]]


async def test_rules_per_user_group_and_anonymous(
    make_client: MakeClient,
    hub: FakeHub,
    ghcr: FakeHub,
    htpasswd: Path,
    images: dict[str, dict[str, Any]],
) -> None:
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd))
    cases = {
        # alice is in the platform group: "**"
        ("alice", "/v2/ghcr.io/team/app/manifests/v1"): 200,
        ("alice", "/v2/someone/app/manifests/v1"): 200,
        # bob by name, and as any authenticated user
        ("bob", "/v2/ghcr.io/team/app/manifests/v1"): 200,
        ("bob", "/v2/team/app/manifests/v1?ns=ghcr.io"): 200,
        ("bob", "/v2/library/nginx/manifests/latest"): 200,
        ("bob", "/v2/someone/app/manifests/v1"): 403,
        # carol: only what "*" grants
        ("carol", "/v2/library/nginx/manifests/latest"): 200,
        ("carol", "/v2/ghcr.io/team/app/manifests/v1"): 403,
        ("carol", "/v2/team/app/manifests/v1?ns=ghcr.io"): 403,
        # no credentials: the anonymous rule (which turns anonymous pulls on); what it
        # does not grant, a user may: the client is challenged for its login
        ("", "/v2/library/busybox/manifests/latest"): 200,
        ("", "/v2/library/nginx/manifests/latest"): 401,
        ("", "/v2/ghcr.io/team/app/manifests/v1"): 401,
    }
    # The refused first: none of them may reach an upstream.
    seen = {}
    for refused in (True, False):
        for user, path in [case for case, status in cases.items() if (status != 200) is refused]:
            seen[user, path] = await status_of(client, path, **(basic(user) if user else {}))
        if refused:
            assert hub.stats.requests == [] and ghcr.stats.requests == []
    assert seen == cases
    assert await denied_counts(client) == {
        ("docker.io", "no_rule"): 1.0,
        ("ghcr.io", "no_rule"): 2.0,
    }


async def test_without_logins_what_no_rule_grants_is_refused_and_counted(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub
) -> None:
    """Rules without an htpasswd (anonymous clients only): nobody can log in, so a
    refusal is the 403 at once, counted, never a challenge."""
    hub.content.add_image("library/busybox", "latest", [b"busybox layer"])
    rules = [{"who": ["anonymous"], "pull": ["docker.io/library/**"]}]
    client = await policy_mirror(make_client, hub, ghcr, auth={"rules": rules})
    assert await status_of(client, "/v2/library/busybox/manifests/latest") == 200
    resp = await client.get("/v2/team/app/manifests/v1")
    assert resp.status == 403 and "WWW-Authenticate" not in resp.headers
    assert await denied_counts(client) == {("docker.io", "no_rule"): 1.0}
    assert not [request for request in hub.stats.requests if "team/app" in str(request)]


async def test_without_an_anonymous_rule_anonymous_clients_must_log_in(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, htpasswd: Path, images: Any
) -> None:
    rules = [{"who": ["*"], "pull": ["docker.io/library/*"]}]
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd, rules))
    resp = await client.get("/v2/library/busybox/manifests/latest")
    assert resp.status == 401 and "WWW-Authenticate" in resp.headers
    assert hub.stats.requests == []


async def test_a_refused_token_is_challenged_where_anonymous_clients_may_pull(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, htpasswd: Path, config: Config
) -> None:
    """A user whose token expired mid-pull is asked to fetch a new one (401, as registries
    answer), not taken for an anonymous client and refused what they may pull (a 403
    clients never retry); a request without credentials is still anonymous."""
    hub.content.add_image("private/secret", "v1", [b"secret layer"])
    hub.content.add_image("library/busybox", "latest", [b"busybox layer"])
    rules = [
        {"who": ["alice"], "pull": ["docker.io/private/**"]},
        {"who": ["*", "anonymous"], "pull": ["docker.io/library/**"]},
    ]
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd, rules))
    path = "/v2/private/secret/manifests/v1"
    url = client.make_url("/")
    audience = f"{url.host}:{url.port}"
    token = await token_for(client, "alice", "private/secret")
    assert await status_of(client, path, Authorization=f"Bearer {token}") == 200
    key = (config.storage.path / "auth" / "signing.key").read_bytes().strip()
    expired, _ = TokenSigner(key).issue("alice", ["private/secret"], -60, audience=audience)
    elsewhere, _ = TokenSigner(key).issue("alice", ["private/secret"], 60, audience="other")
    forged, _ = TokenSigner(b"another mirror's key, 32 bytes or more").issue(
        "alice", ["private/secret"], 60, audience=audience
    )
    hub.stats.reset()
    for refused in (expired, elsewhere, forged):
        resp = await client.get(path, headers={"Authorization": f"Bearer {refused}"})
        assert resp.status == 401 and error(await resp.read())["code"] == "UNAUTHORIZED"
        assert resp.headers["WWW-Authenticate"] == (
            f'Bearer realm="http://{audience}/token",service="{audience}",'
            'scope="repository:private/secret:pull",error="invalid_token"'
        )
    assert hub.stats.requests == []
    # What the client does next: a new token, and the pull goes on.
    token = await token_for(client, "alice", "private/secret")
    assert await status_of(client, path, Authorization=f"Bearer {token}") == 200
    # No credentials, or the token /token gives them: anonymous as before.
    assert await status_of(client, "/v2/library/busybox/manifests/latest") == 200
    anonymous = await token_for(client, None, "library/busybox")
    public = "/v2/library/busybox/manifests/latest"
    assert await status_of(client, public, Authorization=f"Bearer {anonymous}") == 200


async def test_what_only_users_may_pull_challenges_a_client_without_credentials(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, htpasswd: Path
) -> None:
    """Where anonymous clients may pull some repositories, one only users may pull is a
    401 challenge to a client without credentials, not a 403: Docker and containerd send
    their login only once challenged, so a logged-in user could never pull it. A client
    without a login then comes back with an anonymous token and is refused; what the
    upstream's lists deny is refused to everyone at once."""
    hub.content.add_image("private/secret", "v1", [b"secret layer"])
    hub.content.add_image("library/busybox", "latest-rc1", [b"rc layer"])
    rules = [
        {"who": ["alice"], "pull": ["docker.io/private/**"]},
        {"who": ["*", "anonymous"], "pull": ["docker.io/library/**"]},
    ]
    upstream = {"deny": ["library/*:*-rc*"]}
    client = await policy_mirror(
        make_client, hub, ghcr, auth=auth_with(htpasswd, rules), docker_io=upstream
    )
    path = "/v2/private/secret/manifests/v1"
    audience = f"{client.make_url('/').host}:{client.make_url('/').port}"
    for method in ("GET", "HEAD"):
        resp = await client.request(method, path)
        assert resp.status == 401, method
        assert resp.headers["WWW-Authenticate"] == (
            f'Bearer realm="http://{audience}/token",service="{audience}",'
            'scope="repository:private/secret:pull"'
        )
    # The client's next step: a token, with its login or without one.
    token = await token_for(client, "alice", "private/secret")
    assert await status_of(client, path, Authorization=f"Bearer {token}") == 200
    anonymous = await token_for(client, None, "private/secret")
    resp = await client.get(path, headers={"Authorization": f"Bearer {anonymous}"})
    assert resp.status == 403 and error(await resp.read())["code"] == "DENIED"
    # Denied to everyone by the upstream's list: no login would help, no challenge.
    assert await status_of(client, "/v2/library/busybox/manifests/latest-rc1") == 403


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return data


async def token_for(client: Client, user: str | None, *names: str) -> str:
    scopes = "&".join(f"scope=repository:{name}:pull" for name in names)
    resp = await client.get(f"/token?service=mirror&{scopes}", headers=basic(user) if user else {})
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["token"])


async def test_the_token_is_narrowed_to_what_the_rules_grant(
    make_client: MakeClient,
    hub: FakeHub,
    ghcr: FakeHub,
    htpasswd: Path,
    images: dict[str, dict[str, Any]],
) -> None:
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd))
    asked = ("library/nginx", "someone/app", "ghcr.io/team/app", "team/app")
    token = await token_for(client, "carol", *asked)
    access = {entry["name"]: entry["actions"] for entry in claims_of(token)["access"]}
    assert access == {
        "library/nginx": ["pull"],
        "someone/app": [],
        "ghcr.io/team/app": [],
        "team/app": [],
    }
    bob = await token_for(client, "bob", *asked)
    bob_access = {entry["name"]: entry["actions"] for entry in claims_of(bob)["access"]}
    # "team/app" may be ghcr.io's (with ?ns=ghcr.io), which bob may pull.
    assert bob_access == {
        "library/nginx": ["pull"],
        "someone/app": [],
        "ghcr.io/team/app": ["pull"],
        "team/app": ["pull"],
    }
    anonymous = await token_for(client, None, "library/busybox", "library/nginx")
    assert [e["actions"] for e in claims_of(anonymous)["access"]] == [["pull"], []]
    # With the narrowed token: the granted repository pulls, the refused one is a 403
    # (a new token would not help, so no challenge), and nothing went upstream for it.
    bearer = {"Authorization": f"Bearer {token}"}
    assert await status_of(client, "/v2/library/nginx/manifests/latest", **bearer) == 200
    resp = await client.get("/v2/someone/app/manifests/v1", headers=bearer)
    assert resp.status == 403 and error(await resp.read())["code"] == "DENIED"
    assert "WWW-Authenticate" not in resp.headers
    assert not [r for r in hub.stats.requests if "/someone/" in r[2]]
    # A repository the token does not name at all, which carol may pull: the usual 401.
    resp = await client.get("/v2/library/busybox/manifests/latest", headers=bearer)
    assert resp.status == 401 and "library/busybox" in resp.headers["WWW-Authenticate"]


async def test_a_token_scope_outside_the_name_grammar_is_left_out(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, htpasswd: Path
) -> None:
    """No request path could name it, so it is no repository to grant or refuse: it never
    reaches the policy's globs (several stars in one segment, 5000 characters)."""
    rules = [{"who": ["*", "anonymous"], "pull": ["docker.io/library/*-*-*"]}]
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd, rules))
    made_up = ["library/" + "-" * 5000 + "/x", "Library/A-B-C", "library/a-b-c/", "/library/a-b-c"]
    token = await token_for(client, None, *made_up, "library/a-b-c", "library/nginx")
    access = {entry["name"]: entry["actions"] for entry in claims_of(token)["access"]}
    assert access == {"library/a-b-c": ["pull"], "library/nginx": []}


# --- audit lines -------------------------------------------------------------------------------


@pytest.fixture
def log_stream() -> Iterator[Callable[[str], io.StringIO]]:
    """setup_logging() writing to a StringIO; the root logger restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level

    def setup(fmt: str, level: str = "INFO") -> io.StringIO:
        setup_logging(level, fmt)
        stream = io.StringIO()
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        return stream

    yield setup
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    logging.getLogger("mirror.audit").setLevel(logging.NOTSET)


async def pull_three(client: Client, digest: str) -> None:
    """What Docker does (HEAD the tag, GET by digest), then a refused pull."""
    creds = basic("bob")
    assert await status_of(client, "/v2/library/nginx/manifests/latest", "HEAD", **creds) == 200
    assert await status_of(client, f"/v2/library/nginx/manifests/{digest}", **creds) == 200
    assert await status_of(client, "/v2/someone/app/manifests/v1", **creds) == 403


async def test_audit_lines_in_json(
    make_client: MakeClient,
    hub: FakeHub,
    ghcr: FakeHub,
    htpasswd: Path,
    images: dict[str, dict[str, Any]],
    log_stream: Callable[[str], io.StringIO],
) -> None:
    stream = log_stream("json")
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd))
    digest = images["nginx"]["digest"]
    await pull_three(client, digest)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    audit = [line for line in lines if line["logger"] == "mirror.audit"]
    common = {"user": "bob", "client": "127.0.0.1", "upstream": "docker.io", "level": "info"}
    assert [{k: line[k] for k in common} for line in audit] == [common] * 3
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in audit)
    picked = [
        tuple(line[k] for k in ("method", "repository", "reference", "digest", "outcome", "status"))
        for line in audit
    ]
    assert picked == [
        ("HEAD", "library/nginx", "latest", digest, "served", 200),
        ("GET", "library/nginx", digest, digest, "served", 200),
        ("GET", "someone/app", "v1", "-", "denied", 403),
    ]
    assert audit[2]["reason"] == "no_rule" and "reason" not in audit[0]
    # Blob requests are not manifest pulls: no audit line for them.
    await status_of(
        client, f"/v2/library/nginx/blobs/{images['nginx']['layers'][0]}", **basic("bob")
    )
    assert sum('"mirror.audit"' in line for line in stream.getvalue().splitlines()) == 3
    assert PASSWORDS["bob"] not in stream.getvalue()


async def test_audit_lines_in_text(
    make_client: MakeClient,
    hub: FakeHub,
    ghcr: FakeHub,
    htpasswd: Path,
    images: dict[str, dict[str, Any]],
    log_stream: Callable[..., io.StringIO],
) -> None:
    # At log.level warning too: audit lines are a record, not chatter.
    stream = log_stream("text", "WARNING")
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd))
    digest = images["nginx"]["digest"]
    await pull_three(client, digest)
    audit = [line for line in stream.getvalue().splitlines() if " mirror.audit " in line]
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO mirror\.audit \[\w+\] "
    # The access line first, as every request has it, then what the audit adds.
    access = r'127\.0\.0\.1 "%s %s" %d \d+B \d+\.\d{3}s upstream=docker\.io "[^"]*" '
    latest = "/v2/library/nginx/manifests/latest"
    by_digest = f"/v2/library/nginx/manifests/{digest}"
    expected = [
        (("HEAD", latest, 200), "user=bob repository=library/nginx reference=latest "
         f"digest={digest} outcome=served"),
        (("GET", by_digest, 200), f"user=bob repository=library/nginx reference={digest} "
         f"digest={digest} outcome=served"),
        (("GET", "/v2/someone/app/manifests/v1", 403),
         "user=bob repository=someone/app reference=v1 digest=- outcome=denied reason=no_rule"),
    ]  # fmt: skip
    assert len(audit) == 3, audit
    for line, ((method, path, status), fields) in zip(audit, expected, strict=True):
        pattern = stamp + access % (method, re.escape(path), status) + re.escape(fields)
        assert re.fullmatch(pattern, line), line


async def test_a_quote_in_what_a_client_sends_cannot_add_fields_to_a_text_audit_line(
    make_client: MakeClient,
    hub: FakeHub,
    ghcr: FakeHub,
    htpasswd: Path,
    images: dict[str, dict[str, Any]],
    log_stream: Callable[..., io.StringIO],
) -> None:
    """The User-Agent and the path go between double quotes: a quote of their own is
    escaped, so a client cannot close them and write `user=alice` after."""
    stream = log_stream("text")
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd))
    forged = 'docker/24" user=alice repository=library/private outcome=served \\"'
    agent = {"User-Agent": forged, **basic("bob")}
    assert await status_of(client, "/v2/library/nginx/manifests/latest", **agent) == 200
    quoting = "/v2/library/nginx%22%20user=alice%20x=%22/manifests/latest"
    assert await status_of(client, quoting, **basic("bob")) == 400  # not a name: no audit
    lines = stream.getvalue().splitlines()
    (audit,) = [line for line in lines if " mirror.audit " in line]
    # A reader of the line takes a quoted value whole, its escaped quotes within it.
    fields = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', audit)
    assert [field for field in fields if field.startswith("user=")] == ["user=bob"], fields
    assert ' "docker/24\\" user=alice repository=library/private outcome=served \\\\\\"" ' in audit
    (access,) = [line for line in lines if " aiohttp.access " in line]
    assert '"GET /v2/library/nginx\\" user=alice x=\\"/manifests/latest" 400 ' in access


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_one_record_per_request_with_both_loggers_on(
    fmt: str, make_client: MakeClient, hub: FakeHub, images: dict[str, dict[str, Any]],
    log_stream: Callable[[str], io.StringIO],
) -> None:  # fmt: skip
    """A manifest request writes its audit record, which holds the access fields too, and
    no access line; any other request its access line alone."""
    stream = log_stream(fmt)
    client = await make_client()
    digest = images["busybox"]["digest"]
    manifest = await client.get("/v2/library/busybox/manifests/latest")
    assert manifest.status == 200
    blob = await client.get(f"/v2/library/busybox/blobs/{images['busybox']['layers'][0]}")
    assert blob.status == 200
    await manifest.read(), await blob.read()
    ids = [manifest.headers["X-Request-ID"], blob.headers["X-Request-ID"]]
    for _ in range(100):  # the access logger runs just after the body went out
        lines = [
            line for line in stream.getvalue().splitlines()
            if "aiohttp.access" in line or "mirror.audit" in line
        ]  # fmt: skip
        per_request = [
            [line for line in lines if f"[{i}]" in line or f'"{i}"' in line] for i in ids
        ]
        if all(per_request):
            break
        await asyncio.sleep(0.02)
    assert [len(found) for found in per_request] == [1, 1], lines
    (audit,), (access,) = per_request
    if fmt == "json":
        entry = json.loads(audit)
        assert entry["logger"] == "mirror.audit"
        assert (entry["path"], entry["digest"], entry["outcome"]) == (
            "/v2/library/busybox/manifests/latest",
            digest,
            "served",
        )
        assert entry["bytes"] > 0 and entry["duration_s"] >= 0 and entry["remote"] == "127.0.0.1"
        assert json.loads(access)["logger"] == "aiohttp.access"
    else:
        assert " mirror.audit " in audit and f"digest={digest}" in audit
        assert '"GET /v2/library/busybox/manifests/latest" 200 ' in audit
        assert " aiohttp.access " in access


async def test_manifests_are_audited_without_a_policy(
    make_client: MakeClient, hub: FakeHub, images: dict[str, dict[str, Any]],
    log_stream: Callable[[str], io.StringIO],
) -> None:  # fmt: skip
    stream = log_stream("json")
    client = await make_client()
    assert await status_of(client, "/v2/library/busybox/manifests/latest") == 200
    assert await status_of(client, "/v2/library/busybox/manifests/nope") == 404
    audit = [json.loads(line) for line in stream.getvalue().splitlines() if "mirror.audit" in line]
    assert [(e["user"], e["reference"], e["outcome"], e["status"]) for e in audit] == [
        ("anonymous", "latest", "served", 200),
        ("anonymous", "nope", "failed", 404),
    ]
