"""Tokens and keys are not weak by configuration (issue 17, item 6).

The attacks: tokens the mirror did not write, though signed with its key (re-encoded with
whitespace or reordered keys, duplicate claims, a `kid`, another algorithm, `alg: none`),
a token issued for another service, a short signing key; and configurations that would
quietly weaken the mirror (.nan durations, a directory as key file, `..` in a glob).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp.test_utils import TestClient

from mirror.access.clienttokens import TokenRefused, TokenSigner, WeakKey
from mirror.cluster.signing import token_signing_key
from mirror.config import AuthConfig, Config, ConfigError, config_from_mapping
from mirror.storage.filesystem import USERS_LOCK
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.test_config import free_port, run_cli

Client = TestClient[Any, Any]
USER, PASSWORD = "alice", "alice-Pa55-k3v8q1"
REPO = "library/busybox"
MANIFEST = f"/v2/{REPO}/manifests/latest"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(key: bytes, header: bytes, payload: bytes, alg: str = "sha256") -> str:
    """A JWS over exactly these bytes: what someone holding the key can make."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    digest = hmac.new(key, signing_input.encode(), getattr(hashlib, alg)).digest()
    return f"{signing_input}.{b64(digest)}"


def claims_for(audience: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "mirror", "sub": USER, "aud": audience, "iat": now, "nbf": now - 5,
        "exp": now + 300, "jti": "0123456789abcdef",
        "access": [{"type": "repository", "name": REPO, "actions": ["pull"]}],
    }  # fmt: skip
    claims.update(changes)
    return claims


def canonical(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


HEADER = canonical({"alg": "HS256", "typ": "JWT"})


def forged_tokens(key: bytes, audience: str) -> dict[str, tuple[str, str]]:
    """{what: (token, the reason the mirror counts)}, every one signed with the real key."""
    claims = claims_for(audience)
    body = canonical(claims)
    spaced = json.dumps(claims, sort_keys=True).encode()
    reordered = json.dumps(dict(reversed(claims.items())), separators=(",", ":")).encode()
    # Two `access` claims: a parser keeping the first would see another grant.
    wider = '[{"type":"repository","name":"*","actions":["pull"]}]'
    duplicate = body[:-1] + b',"access":' + wider.encode() + b"}"
    padded_header = base64.urlsafe_b64encode(HEADER).decode() + "=" * 4
    padded_input = f"{padded_header}.{b64(body)}"
    padded = f"{padded_input}.{b64(hmac.new(key, padded_input.encode(), 'sha256').digest())}"
    return {
        "whitespace in the payload": (sign(key, HEADER, spaced), "noncanonical"),
        "keys reordered": (sign(key, HEADER, reordered), "noncanonical"),
        "a duplicate claim": (sign(key, HEADER, duplicate), "noncanonical"),
        "a kid header": (
            sign(key, canonical({"alg": "HS256", "kid": "../../etc/passwd", "typ": "JWT"}), body),
            "noncanonical",
        ),
        "a header with spaces": (
            sign(key, b'{"alg": "HS256", "typ": "JWT"}', body),
            "noncanonical",
        ),
        "base64 padding": (padded, "malformed"),
        "alg HS512": (
            sign(key, canonical({"alg": "HS512", "typ": "JWT"}), body, "sha512"),
            "algorithm",
        ),
        "alg none": (f"{b64(canonical({'alg': 'none', 'typ': 'JWT'}))}.{b64(body)}.", "algorithm"),
        "another service": (sign(key, HEADER, canonical(claims_for("evil.example"))), "audience"),
        "no audience": (
            sign(key, HEADER, canonical({k: v for k, v in claims.items() if k != "aud"})),
            "malformed",
        ),
        "expired": (
            sign(key, HEADER, canonical(claims_for(audience, exp=int(time.time()) - 1))),
            "expired",
        ),
    }


def basic_auth() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"{USER}:{hashed}\n")
    return path


async def auth_client(make_client: MakeClient, htpasswd: Path, **auth: Any) -> Client:
    return await make_client(auth=AuthConfig(htpasswd=htpasswd, **auth))


def service_of(client: Client) -> str:
    url = client.make_url("/")
    return f"{url.host}:{url.port}"


async def refused_counts(client: Client) -> dict[str, float]:
    text = await (await client.get("/metrics")).text()
    pattern = r'^mirror_client_auth_refused_total\{reason="(\w+)"\} (\S+)$'
    return {reason: float(value) for reason, value in re.findall(pattern, text, re.M)}


@pytest.mark.parametrize("anonymous_pull", [False, True])
async def test_tokens_the_mirror_did_not_write_are_refused(
    anonymous_pull: bool,
    make_client: MakeClient,
    htpasswd: Path,
    hub: FakeHub,
    config: Config,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused with a challenge even where anonymous clients may pull: a refused token is
    no anonymous request (the client then asks the realm for a new token)."""
    hub.content.add_image(REPO, "latest", [b"busybox layer"])
    client = await auth_client(make_client, htpasswd, anonymous_pull=anonymous_pull)
    key = (config.storage.path / "auth" / "signing.key").read_bytes().strip()
    caplog.set_level(logging.DEBUG)
    forged = forged_tokens(key, service_of(client))
    for what, (token, _) in forged.items():
        resp = await client.get(MANIFEST, headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 401, what
        challenge = resp.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer realm=") and challenge.endswith(
            f',scope="repository:{REPO}:pull",error="invalid_token"'
        ), what
    wanted: dict[str, float] = {}
    for _, reason in forged.values():
        wanted[reason] = wanted.get(reason, 0) + 1
    assert await refused_counts(client) == wanted
    assert hub.stats["manifest_get"] == 0 and hub.stats["token"] == 0  # nothing went upstream
    assert _cached(config) == [], _cached(config)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert not [what for what, (token, _) in forged.items() if token in logged]
    # The mirror's own token, for the same service, still works.
    own = await client.get(
        f"/token?service=x&scope=repository:{REPO}:pull",
        headers=basic_auth(),
    )
    token = (await own.json())["token"]
    assert (await client.get(MANIFEST, headers={"Authorization": f"Bearer {token}"})).status == 200


def _cached(config: Config) -> list[str]:
    root = config.storage.path
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "auth" not in p.parts and p.name != USERS_LOCK
    ]


async def test_a_token_for_one_name_is_refused_at_another(
    make_client: MakeClient, htpasswd: Path, hub: FakeHub
) -> None:
    hub.content.add_image(REPO, "latest", [b"busybox layer"])
    client = await auth_client(make_client, htpasswd)
    creds = basic_auth()
    # A token fetched through one name of the mirror (the challenge's service)...
    resp = await client.get(
        f"/token?scope=repository:{REPO}:pull", headers={**creds, "Host": "internal.example"}
    )
    token = (await resp.json())["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    # ...is refused where the mirror goes by another, and accepted where it was issued.
    assert (await client.get(MANIFEST, headers={**bearer, "Host": "public.example"})).status == 401
    assert (await refused_counts(client)).get("audience") == 1
    assert (
        await client.get(MANIFEST, headers={**bearer, "Host": "internal.example"})
    ).status == 200


def test_tokens_issued_by_one_replica_work_on_another() -> None:
    secret = b"the cluster secret, shared by every replica"
    first, second = TokenSigner(token_signing_key(secret)), TokenSigner(token_signing_key(secret))
    token, _ = first.issue(USER, [REPO], 60, audience="mirror.example")
    assert second.verify(token, "mirror.example").allows(REPO)
    with pytest.raises(TokenRefused, match="audience"):
        second.verify(token, "other.example")
    stranger = TokenSigner(token_signing_key(b"another cluster's secret, as long"))
    with pytest.raises(TokenRefused, match="signature"):
        stranger.verify(token, "mirror.example")


def test_a_short_key_signs_nothing() -> None:
    with pytest.raises(WeakKey):
        TokenSigner(b"password")


# --- refused at load: exit 2, one line naming the key -------------------------------------


def test_a_short_signing_key_file_stops_the_mirror(tmp_path: Path, htpasswd: Path) -> None:
    key_file = tmp_path / "signing.key"
    key_file.write_text("hunter2\n")
    config = tmp_path / "mirror.yaml"
    config.write_text(f"auth: {{htpasswd: {htpasswd}, signing_key_file: {key_file}}}\n")
    result = run_cli("serve", "--config", str(config), "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("mirror: config: auth.signing_key_file: "), result.stderr
    assert "7 bytes" in result.stderr and "hunter2" not in result.stderr


def test_a_short_generated_key_left_on_disk_stops_the_mirror(
    tmp_path: Path, htpasswd: Path
) -> None:
    storage = tmp_path / "data"
    (storage / "auth").mkdir(parents=True)
    (storage / "auth" / "signing.key").write_text("short\n")
    config = tmp_path / "mirror.yaml"
    config.write_text(f"auth: {{htpasswd: {htpasswd}}}\nstorage: {{path: {storage}}}\n")
    result = run_cli("serve", "--config", str(config), "--listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stderr
    assert "auth.signing_key_file" in result.stderr.splitlines()[-1], result.stderr


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("auth: {htpasswd: HTPASSWD, groups: {ops: [alice]}}", "auth.groups"),
        ("auth: {htpasswd: HTPASSWD, signing_key_file: TMP}", "auth.signing_key_file"),
        ("auth: {htpasswd: [HTPASSWD]}", "auth.htpasswd"),
        ("auth: {htpasswd: HTPASSWD, signing_key_file: 12}", "auth.signing_key_file"),
        ("auth: {token_ttl: .nan}", "auth.token_ttl"),
        ("cache: {tag_ttl: .inf}", "cache.tag_ttl"),
        ("cache: {stale_if_error: .nan}", "cache.stale_if_error"),
        ("storage: {max_size: .inf}", "storage.max_size"),
        ("storage: {path: [a, b]}", "storage.path"),
        ("upstream: {allow: ['library/../secret']}", "upstream.allow[0]"),
        ("upstream: {deny: ['..']}", "upstream.deny[0]"),
        ("auth: {htpasswd: HTPASSWD, rules: [{who: ['*'], pull: ['docker.io/../x']}]}",
         "auth.rules[0].pull[0]"),
        ("trusted_proxies: [10]", "trusted_proxies[0]"),
    ],
)  # fmt: skip
def test_weakening_values_fail_at_load(
    tmp_path: Path, htpasswd: Path, yaml_text: str, key: str
) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(yaml_text.replace("HTPASSWD", str(htpasswd)).replace("TMP", str(tmp_path)))
    result = run_cli("serve", "--config", str(config), "--listen", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"mirror: config: {key}: "), result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_values_load_as_before() -> None:
    """What stays allowed: a nan-free duration, dotted names, groups used by rules."""
    raw = {
        "cache": {"tag_ttl": "10m"},
        "upstream": {"allow": ["library/node.js", "a.b/c-d"]},
    }
    assert config_from_mapping(raw).cache.tag_ttl == 600
    with pytest.raises(ConfigError, match="auth.groups"):
        config_from_mapping({"auth": {"groups": {"ops": ["alice"]}}})
