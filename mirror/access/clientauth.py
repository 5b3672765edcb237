"""Client authentication: an htpasswd file, and the mirror's own token service.

With `auth.htpasswd` set, every API request needs a token the mirror signed (or Basic
credentials from the file). The 401 challenge names the mirror's own `/token` as realm,
never an upstream's, so `docker login`, skopeo, podman and containerd work with the
mirror as with any registry. Tokens (mirror/access/clienttokens.py) are HS256 JWTs signed
with a key shared by replicas.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Iterable
from pathlib import Path

import bcrypt

from mirror.access.hashing import HashPool
from mirror.config.auth import check_signing_key, parse_htpasswd
from mirror.config.values import ConfigError
from mirror.oci.reference import is_valid_name
from mirror.util.lru import LRU
from mirror.util.singleflight import SingleFlight

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
        # Checks under way, by the `_key` of their credentials: the same login sent many
        # times at once (a deployment's pods starting, a CI fleet) costs one bcrypt check.
        self._checking = SingleFlight()
        self._decoys: dict[int, bytes] = {}  # bcrypt cost → a hash no password matches

    def _reload_sync(self) -> None:
        try:
            mtime = self._path.stat().st_mtime
        except OSError as exc:
            log.error("cannot read htpasswd file %s: %s", self._path, exc.strerror)
            return
        if mtime == self._mtime:
            return
        try:
            text = self._path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:  # the users loaded before stay
            log.error("cannot read htpasswd file %s: %s", self._path, type(exc).__name__)
            return
        users, unchecked = parse_htpasswd(text)
        for number, name in unchecked:  # the start refused them: written since
            log.warning("htpasswd %s line %d (%s): not a bcrypt hash, ignored (htpasswd -B)",
                        self._path, number, name)  # fmt: skip
        self._users, self._mtime = users, mtime
        log.info("loaded %d users from %s", len(users), self._path)

    async def load(self) -> None:
        """Read the file now (at start: logins arriving while a first read is under way
        would find no users, and fail)."""
        self._checked_at = time.monotonic()
        await asyncio.to_thread(self._reload_sync)

    async def _refresh(self) -> None:
        if time.monotonic() - self._checked_at > HTPASSWD_RECHECK:
            await self.load()

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

    def knows(self, username: str) -> bool:
        """Whether `username` is one of the file's users (as last read)."""
        return username in self._users

    def pending(self, username: str, password: str) -> Awaitable[bool] | None:
        """The answer of the same check already under way, or None when there is none."""
        hashed = self._users.get(username)
        if hashed is None:
            return None
        running: Awaitable[bool] | None = self._checking.running(
            self._key(username, password, hashed)
        )
        return running

    async def verify(self, username: str, password: str, owner: str = "") -> bool:
        """Whether the password is `username`'s, checked on the pool as `owner`'s (a
        client address, for its share of the pool)."""
        if len(password.encode()) > BCRYPT_MAX_PASSWORD:
            return False
        if await self.remembered(username, password):
            return True
        hashed = self._users.get(username)
        if hashed is None:
            # An unknown name costs what a wrong password costs, so that timing does not
            # tell which names exist.
            decoy = await self._decoy(owner)
            await self._pool.run(bcrypt.checkpw, password.encode(), decoy, owner=owner)
            return False
        key = self._key(username, password, hashed)
        return await self._checking.do(key, lambda: self._check(key, password, hashed, owner))

    async def _check(self, key: str, password: str, hashed: bytes, owner: str) -> bool:
        ok = await self._pool.run(bcrypt.checkpw, password.encode(), hashed, owner=owner)
        if ok:
            self._verified.put(key, time.monotonic())
        return ok

    async def _decoy(self, owner: str) -> bytes:
        """A hash at the file's most common cost, made once per cost (on the pool)."""
        cost = usual_cost(self._users.values())
        decoy = self._decoys.get(cost)
        if decoy is None:
            salt = bcrypt.gensalt(rounds=cost)
            decoy = await self._pool.run(bcrypt.hashpw, secrets.token_bytes(16), salt, owner=owner)
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


def load_signing_key(path: Path) -> bytes:
    """The key at `path`, created (random, mode 0600) when absent (blocking); a directory
    or a key too short to sign with is a ConfigError naming auth.signing_key_file (checked
    again here: the default path is not the config's to check, and files change)."""
    check_signing_key(path)
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        return _create_signing_key(path)
    except OSError as exc:  # a file where its directory goes, say
        reason = f"cannot read {str(path)!r}: {exc.strerror}"
        raise ConfigError("auth.signing_key_file", reason) from None


def _create_signing_key(path: Path) -> bytes:
    key = secrets.token_hex(32).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(key)
    except OSError as exc:  # a read-only or full disk: tokens need a key every worker reads
        raise ConfigError(
            "auth.signing_key_file",
            f"cannot create {str(path)!r}: {exc.strerror}; point it at a writable path or "
            "an existing key",
        ) from None
    return key


def requested_repositories(scopes: list[str]) -> list[str]:
    """Repositories asked for pull in `repository:<name>:<actions>` scopes (several per
    parameter allowed, space-separated).

    A name outside the repository grammar is left out, before any policy check: no request
    path could name it, and the policy's globs need not match what the client made up."""
    names = []
    for scope in " ".join(scopes).split():
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind == "repository" and is_valid_name(name) and "pull" in actions.split(","):
            names.append(name)
    return names
