"""The mirror's bearer tokens: HS256 JWTs it issues at `/token` and checks on every request.

PyJWT checks the algorithm (HS256 only: never `none`, never one the token names), the
signature, the times and the audience. On top, a token must be byte for byte what the
mirror would issue for its claims (sorted keys, no whitespace, no padding, no extra header
fields such as `kid`): whatever the mirror did not write itself is refused, so no parser
difference (duplicate keys, re-encodings) can make one token mean two things.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from mirror.config.auth import MIN_SIGNING_KEY_BYTES as MIN_KEY_BYTES
from mirror.util.lru import LRU

ALGORITHM = "HS256"
ISSUER = "mirror"
REQUIRED_CLAIMS = ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "access"]
# Replicas' clocks differ a little: a token is valid from a few seconds before it is issued.
CLOCK_SKEW = 5
# Good tokens remembered with their grant, so a repeat is a dict lookup and a time check.
VERIFIED_ENTRIES = 1000

# PyJWT's errors, in the words of mirror_client_auth_refused_total's `reason` label.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "audience"),
    (jwt.InvalidSignatureError, "signature"),
    (jwt.InvalidAlgorithmError, "algorithm"),
)
TOKEN_REASONS = ("malformed", "noncanonical", *(reason for _, reason in _REASONS))


class WeakKey(ValueError):
    """A signing key shorter than MIN_KEY_BYTES."""


class TokenRefused(Exception):
    """A bearer token the mirror does not accept; `reason` is one of TOKEN_REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Grant:
    """What a verified token allows."""

    subject: str
    repositories: frozenset[str]

    def allows(self, repository: str | None) -> bool:
        return repository is None or repository in self.repositories or "*" in self.repositories


def canonical_json(value: dict[str, Any]) -> bytes:
    """The one encoding the mirror writes: sorted keys, no whitespace, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class TokenSigner:
    """Issues and checks the mirror's bearer tokens for one signing key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise WeakKey(f"a signing key needs {MIN_KEY_BYTES} bytes at least, got {len(key)}")
        self._key = key
        self._verified: LRU[tuple[str, str], tuple[Grant, float, float]] = LRU(VERIFIED_ENTRIES)
        self._jws = jwt.PyJWS(algorithms=[ALGORITHM], options={"enforce_minimum_key_length": True})
        self._jwt = jwt.PyJWT(
            {"enforce_minimum_key_length": True, "require": REQUIRED_CLAIMS, "strict_aud": True}
        )

    def issue(
        self,
        subject: str,
        repositories: list[str],
        ttl: float,
        refused: Sequence[str] = (),
        *,
        audience: str,
    ) -> tuple[str, int]:
        """A token for `audience` (the service of the challenge) to pull `repositories`;
        `refused` ones are listed with no actions."""
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "nbf": now - CLOCK_SKEW,
            "exp": now + int(ttl),
            "jti": secrets.token_hex(8),
            "access": [
                {"type": "repository", "name": name, "actions": ["pull"]} for name in repositories
            ]
            + [{"type": "repository", "name": name, "actions": []} for name in refused],
        }
        return self._encode(claims), int(ttl)

    def _encode(self, claims: dict[str, Any]) -> str:
        return self._jws.encode(canonical_json(claims), self._key, algorithm=ALGORITHM)

    def verify(self, token: str, audience: str) -> Grant:
        """The token's grant, or TokenRefused saying why not.

        A client sends the same token for minutes: a good one's grant and times are
        remembered (per audience), so a repeat costs the time check, not a JWT decode."""
        known = self._verified.get((token, audience))
        if known is None:
            known = self._check(token, audience)
            self._verified.put((token, audience), known)
        grant, not_before, expires = known
        now = time.time()
        if now >= expires:
            raise TokenRefused("expired")
        if now < not_before:
            raise TokenRefused("not_yet_valid")
        return grant

    def _check(self, token: str, audience: str) -> tuple[Grant, float, float]:
        """The grant, `nbf` and `exp` of a token this key issued for `audience`."""
        claims = self._decode(token, audience)
        if self._encode(claims) != token:  # re-encoded, spaced, reordered, duplicate keys
            raise TokenRefused("noncanonical")
        access = claims["access"]
        if not isinstance(access, list) or not all(isinstance(e, dict) for e in access):
            raise TokenRefused("malformed")
        names = {
            str(entry.get("name", "")) for entry in access if "pull" in entry.get("actions", [])
        }
        grant = Grant(claims["sub"], frozenset(names))
        return grant, float(claims["nbf"]), float(claims["exp"])

    def _decode(self, token: str, audience: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = self._jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=audience,
                issuer=ISSUER,
                # iat is only required: another replica's clock may run a little ahead.
                options={"verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            reason = next((r for kind, r in _REASONS if isinstance(exc, kind)), "malformed")
            raise TokenRefused(reason) from None
        return claims
