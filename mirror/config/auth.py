"""The `auth:` section: client authentication, off unless `htpasswd` is set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.config.values import ConfigError, optional_path, parse_duration, section

# `groups` and `rules` are the pull policy's: mirror/config/policy.py.
AUTH_KEYS = {"htpasswd", "anonymous_pull", "token_ttl", "signing_key_file", "groups", "rules"}
# RFC 7518 3.2: an HS256 key at least as long as the hash.
MIN_SIGNING_KEY_BYTES = 32


@dataclass(frozen=True)
class AuthConfig:
    """Client authentication: off unless `htpasswd` is set."""

    htpasswd: Path | None = None
    anonymous_pull: bool = False
    token_ttl: float = 300.0
    signing_key_file: Path | None = None


def parse_auth(raw: Mapping[str, Any]) -> AuthConfig:
    """`auth:` validated; the htpasswd file must exist."""
    sec = section(raw, "auth", AUTH_KEYS)
    anonymous = sec.get("anonymous_pull", False)
    if not isinstance(anonymous, bool):
        raise ConfigError("auth.anonymous_pull", f"expected true or false, got {anonymous!r}")
    htpasswd = optional_path("auth.htpasswd", sec.get("htpasswd"))
    if htpasswd is not None and not htpasswd.is_file():
        raise ConfigError("auth.htpasswd", f"no such file: {str(htpasswd)!r}")
    if htpasswd is not None:
        htpasswd_users(htpasswd)  # its lines checked now, not found wanting at each login
    key_file = optional_path("auth.signing_key_file", sec.get("signing_key_file"))
    if key_file is not None:
        check_signing_key(key_file)
    token_ttl = parse_duration("auth.token_ttl", sec.get("token_ttl", 300))
    if token_ttl < 1:  # token times are whole seconds
        raise ConfigError("auth.token_ttl", f"must be at least 1s, got {sec['token_ttl']!r}")
    return AuthConfig(
        htpasswd=htpasswd,
        anonymous_pull=anonymous,
        token_ttl=token_ttl,
        signing_key_file=key_file,
    )


def check_signing_key(path: Path) -> None:
    """A signing key file that exists must be a file holding a long enough key (an
    absent one is generated at start)."""
    key = "auth.signing_key_file"
    if not path.exists():
        return
    if not path.is_file():
        raise ConfigError(key, f"{str(path)!r} is not a file")
    try:
        length = len(path.read_bytes().strip())
    except OSError as exc:
        raise ConfigError(key, f"cannot read {str(path)!r}: {exc.strerror}") from None
    if length < MIN_SIGNING_KEY_BYTES:
        raise ConfigError(
            key,
            f"{str(path)!r} holds {length} bytes: a signing key needs "
            f"{MIN_SIGNING_KEY_BYTES} at least",
        )


def htpasswd_users(path: object) -> set[str]:
    """The user names in the htpasswd file; ConfigError naming auth.htpasswd when it
    cannot be read, or holds a hash the mirror does not check (only bcrypt's)."""
    if path is None:
        return set()
    try:
        text = Path(str(path)).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("auth.htpasswd", f"cannot read {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("auth.htpasswd", f"{str(path)!r} is not UTF-8 text") from None
    users, unchecked = parse_htpasswd(text)
    if unchecked:
        number, name = unchecked[0]
        raise ConfigError(
            "auth.htpasswd",
            f"line {number} ({name!r}) of {str(path)!r} is not a bcrypt hash: make it "
            "with htpasswd -B",
        )
    return set(users)


def parse_htpasswd(text: str) -> tuple[dict[str, bytes], list[tuple[int, str]]]:
    """An htpasswd file's users and their bcrypt hashes, and (line number, user) of the
    lines whose hash is another kind (Apache's htpasswd makes MD5, `$apr1$`, unless -B):
    none the mirror checks."""
    users: dict[str, bytes] = {}
    unchecked: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        name, sep, hashed = line.strip().partition(":")
        if not (sep and name):
            continue
        if hashed.startswith("$2"):
            users[name] = hashed.encode()
        else:
            unchecked.append((number, name))
    return users, unchecked
