"""Client authentication: an htpasswd file, and the mirror's own token service.

With `auth.htpasswd` set, every API request needs a token the mirror signed (or Basic
credentials from the file). The 401 challenge names the mirror's own `/token` as realm,
never an upstream's, so `docker login`, skopeo, podman and containerd work with the
mirror as with any registry. Tokens are HS256 JWTs signed with a key shared by replicas.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt

from mirror.access.hashing import HashPool
from mirror.util.lru import LRU

log = logging.getLogger(__name__)

# bcrypt costs ~50-250 ms a check by design: remember good credentials for a while, by
# a hash of them (never the password itself), so Basic auth on every request stays cheap.
VERIFIED_FOR = 300.0
VERIFIED_ENTRIES = 1000
HTPASSWD_RECHECK = 10.0
# bcrypt reads no further (and bcrypt 5 refuses more): a longer password never matches,
# as the distribution registry answers (Go's bcrypt.ErrPasswordTooLong).
BCRYPT_MAX_PASSWORD = 72
# The costs bcrypt accepts, and its default.
MIN_COST, MAX_COST, DEFAULT_COST = 4, 31, 12


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_basic(header: str) -> tuple[str, str] | None:
    """(username, password) from an `Authorization: Basic` value, or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8 once decoded
        return None
    username, sep, password = decoded.partition(":")
    return (username, password) if sep else None


class Htpasswd:
    """Users and bcrypt hashes from an htpasswd file, re-read when it changes.

    bcrypt runs on `pool` (its own threads, never the file I/O ones); HashPoolFull when
    that is full.
    """

    def __init__(self, path: Path, pool: HashPool) -> None:
        self._path = path
        self._pool = pool
        self._users: dict[str, bytes] = {}
        self._mtime = -1.0
        self._checked_at = 0.0
        self._verified: LRU[str, float] = LRU(VERIFIED_ENTRIES)
        self._decoys: dict[int, bytes] = {}  # bcrypt cost → a hash no password matches

    def _reload_sync(self) -> None:
        try:
            mtime = self._path.stat().st_mtime
        except OSError as exc:
            log.error("cannot read htpasswd file %s: %s", self._path, exc.strerror)
            return
        if mtime == self._mtime:
            return
        users = {}
        for line in self._path.read_text().splitlines():
            name, sep, hashed = line.strip().partition(":")
            if sep and name and hashed.startswith("$2"):
                users[name] = hashed.encode()
        self._users, self._mtime = users, mtime
        log.info("loaded %d users from %s", len(users), self._path)

    async def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at > HTPASSWD_RECHECK:
            self._checked_at = now
            await asyncio.to_thread(self._reload_sync)

    def _key(self, username: str, password: str, hashed: bytes) -> str:
        return hashlib.sha256(
            b"\0".join([username.encode(), password.encode(), hashed])
        ).hexdigest()

    async def remembered(self, username: str, password: str) -> bool:
        """Whether these credentials were verified lately (no bcrypt needed)."""
        await self._refresh()
        hashed = self._users.get(username)
        if hashed is None or len(password.encode()) > BCRYPT_MAX_PASSWORD:
            return False
        verified_at = self._verified.get(self._key(username, password, hashed))
        return verified_at is not None and time.monotonic() - verified_at < VERIFIED_FOR

    async def verify(self, username: str, password: str) -> bool:
        if len(password.encode()) > BCRYPT_MAX_PASSWORD:
            return False
        if await self.remembered(username, password):
            return True
        hashed = self._users.get(username)
        if hashed is None:
            # An unknown name costs what a wrong password costs, so that timing does not
            # tell which names exist.
            await self._pool.run(bcrypt.checkpw, password.encode(), await self._decoy())
            return False
        ok = await self._pool.run(bcrypt.checkpw, password.encode(), hashed)
        if ok:
            self._verified.put(self._key(username, password, hashed), time.monotonic())
        return ok

    async def _decoy(self) -> bytes:
        """A hash at the file's most common cost, made once per cost (on the pool)."""
        cost = usual_cost(self._users.values())
        decoy = self._decoys.get(cost)
        if decoy is None:
            salt = bcrypt.gensalt(rounds=cost)
            decoy = await self._pool.run(bcrypt.hashpw, secrets.token_bytes(16), salt)
            self._decoys[cost] = decoy
        return decoy


def usual_cost(hashes: Iterable[bytes]) -> int:
    """The most common bcrypt cost among `hashes` (`$2y$10$…` → 10); bcrypt's default
    when there are none."""
    costs = Counter(
        int(parts[2]) for parts in (hashed.split(b"$") for hashed in hashes) if _cost_ok(parts)
    )
    return costs.most_common(1)[0][0] if costs else DEFAULT_COST


def _cost_ok(parts: list[bytes]) -> bool:
    return len(parts) > 3 and parts[2].isdigit() and MIN_COST <= int(parts[2]) <= MAX_COST


@dataclass(frozen=True)
class Grant:
    """What a verified token allows."""

    subject: str
    repositories: frozenset[str]

    def allows(self, repository: str | None) -> bool:
        return repository is None or repository in self.repositories or "*" in self.repositories


class TokenSigner:
    """Issues and checks the mirror's bearer tokens (HS256 JWTs)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._verified: LRU[str, tuple[Grant, Any, Any]] = LRU(VERIFIED_ENTRIES)

    def issue(
        self, subject: str, repositories: list[str], ttl: float, refused: Sequence[str] = ()
    ) -> tuple[str, int]:
        """A token to pull `repositories`; `refused` ones are listed with no actions."""
        now = int(time.time())
        claims = {
            "iss": "mirror",
            "sub": subject,
            "iat": now,
            "nbf": now - 5,
            "exp": now + int(ttl),
            "jti": secrets.token_hex(8),
            "access": [
                {"type": "repository", "name": name, "actions": ["pull"]} for name in repositories
            ]
            + [{"type": "repository", "name": name, "actions": []} for name in refused],
        }
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
        signature = _b64url(self._sign(f"{header}.{payload}"))
        return f"{header}.{payload}.{signature}", int(ttl)

    def _sign(self, text: str) -> bytes:
        return hmac.new(self._key, text.encode(), hashlib.sha256).digest()

    def verify(self, token: str) -> Grant | None:
        """The token's grant when the signature and times check out, else None.

        A client sends the same token for minutes: a good one's grant and times are
        remembered, so a repeat costs the time check, not an HMAC and a JSON parse."""
        known = self._verified.get(token)
        if known is None:
            known = self._check(token)
            if known is None:
                return None
            self._verified.put(token, known)
        grant, not_before, expires = known
        return grant if not_before <= time.time() < expires else None

    def _check(self, token: str) -> tuple[Grant, Any, Any] | None:
        """The grant, `nbf` and `exp` of a token this key signed; None for any other."""
        try:
            header, payload, signature = token.split(".")
            if not hmac.compare_digest(_unb64url(signature), self._sign(f"{header}.{payload}")):
                return None
            claims: dict[str, Any] = json.loads(_unb64url(payload))
        except (ValueError, binascii.Error):
            return None
        names = {
            entry.get("name", "")
            for entry in claims.get("access", [])
            if isinstance(entry, dict) and "pull" in entry.get("actions", [])
        }
        grant = Grant(str(claims.get("sub", "")), frozenset(names))
        return grant, claims.get("nbf", 0), claims.get("exp", 0)


def load_signing_key(path: Path) -> bytes:
    """The key at `path`, created (random, mode 0600) when absent (blocking)."""
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(key)
    return key


def requested_repositories(scopes: list[str]) -> list[str]:
    """Repositories asked for pull in `repository:<name>:<actions>` scopes (several per
    parameter allowed, space-separated)."""
    names = []
    for scope in " ".join(scopes).split():
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind == "repository" and name and "pull" in actions.split(","):
            names.append(name)
    return names
