"""The pull policy's settings: each upstream's `allow`/`deny` globs and `auth.groups` and
`auth.rules`, validated into plain data; mirror/access/policy.py compiles the matcher.

Globs are checked here in full (segments, tag part, digest part, the upstream a rule glob
names), so that a bad policy fails at load, naming its key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mirror.config.auth import htpasswd_users
from mirror.config.upstreams import DEFAULT_UPSTREAM, DOCKER_HUB_HOSTS, UpstreamConfig
from mirror.config.values import ConfigError, parse_url

ANONYMOUS = "anonymous"
ANY_USER = "*"
RESERVED = frozenset({ANONYMOUS, ANY_USER})
ANY_SEGMENTS = "**"

_REPO_SEGMENT = re.compile(r"[a-z0-9._*-]+")
_UPSTREAM_SEGMENT = re.compile(r"[A-Za-z0-9._:*-]+")
_TAG_GLOB = re.compile(r"[A-Za-z0-9._*-]{1,128}")
# The digest grammar of mirror/oci/reference.py, restated: config imports nothing else of
# the mirror (tests/test_policy.py checks that the two agree).
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")


@dataclass(frozen=True)
class GlobSpec:
    """A checked glob: its `/`-separated segments (`**` among them), a tag glob or digest."""

    text: str
    segments: tuple[str, ...]
    tag: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class ListsConfig:
    """One upstream's `allow` (None: everything) and `deny` globs."""

    allow: tuple[GlobSpec, ...] | None = None
    deny: tuple[GlobSpec, ...] = ()


@dataclass(frozen=True)
class RuleConfig:
    """`{who: [...], pull: [...]}` with groups expanded to their members."""

    users: frozenset[str]
    any_user: bool
    anonymous: bool
    pulls: tuple[GlobSpec, ...]


@dataclass(frozen=True)
class PolicyConfig:
    """Every upstream's lists and the rules (None: no rules, any client may pull)."""

    by_upstream: tuple[tuple[str, ListsConfig], ...] = ()
    default: ListsConfig = ListsConfig()
    rules: tuple[RuleConfig, ...] | None = None


def validate_glob(
    key: str, value: object, known_upstreams: frozenset[str] | None = None
) -> GlobSpec:
    """A glob from the config; with `known_upstreams`, a rule glob whose first segment
    names an upstream (a literal name must be one of them)."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a glob string, got {value!r}")
    path, at, digest = value.partition("@")
    head, slash, last = path.rpartition("/")
    last, colon, tag = last.partition(":")
    segments = [*head.split("/"), last] if slash else [last]
    if any(not segment for segment in segments) or (colon and not tag) or (at and not digest):
        raise ConfigError(key, f"malformed glob {value!r}: an empty part")
    if colon and not _TAG_GLOB.fullmatch(tag):
        raise ConfigError(key, f"malformed glob {value!r}: bad tag part {tag!r}")
    if at and not _DIGEST.fullmatch(digest):
        raise ConfigError(key, f"malformed glob {value!r}: bad digest part")
    for index, segment in enumerate(segments):
        _check_segment(key, value, segment, known_upstreams if index == 0 else None)
    if known_upstreams is not None and len(segments) < 2 and segments[0] != ANY_SEGMENTS:
        raise ConfigError(key, f"malformed glob {value!r}: expected <upstream>/<repository glob>")
    return GlobSpec(value, tuple(segments), tag if colon else None, digest if at else None)


def _check_segment(
    key: str, value: str, segment: str, known_upstreams: frozenset[str] | None
) -> None:
    """One segment; `known_upstreams` is given for the first segment of a rule glob."""
    if segment == ANY_SEGMENTS:
        return
    upstream = known_upstreams is not None
    allowed = _UPSTREAM_SEGMENT if upstream else _REPO_SEGMENT
    # "." and "..": path-like segments no repository has; a glob naming them is a mistake
    # or an attempt to reach outside what it seems to allow.
    if "**" in segment or not allowed.fullmatch(segment) or not segment.strip("."):
        raise ConfigError(key, f"malformed glob {value!r}: bad segment {segment!r}")
    if upstream and "*" not in segment and segment not in (known_upstreams or ()):
        raise ConfigError(key, f"{value!r} names no configured upstream: {segment!r}")


def parse_policy(
    raw: Mapping[str, Any], default: UpstreamConfig, others: Sequence[UpstreamConfig]
) -> PolicyConfig | None:
    """The policy of a config document (None when it sets none), after the rest of it has
    been validated: upstream entries, `auth.htpasswd`."""
    entries = _upstream_entries(raw)
    by_upstream = {name: _lists(key, entry) for name, (key, entry) in entries.items()}
    auth = raw.get("auth") or {}
    rules = None
    if auth.get("groups") is not None and auth.get("rules") is None:
        raise ConfigError("auth.groups", "set without auth.rules: groups are named only in rules")
    if auth.get("rules") is not None:
        known = _known_upstreams(default, others)
        groups = _groups(auth.get("groups"))
        rules = _rules(auth["rules"], groups, htpasswd_users(auth.get("htpasswd")), known)
        if auth.get("anonymous_pull") is False and any(rule.anonymous for rule in rules):
            raise ConfigError(
                "auth.rules", "a rule names anonymous but auth.anonymous_pull is false"
            )
        if auth.get("htpasswd") is None and not any(rule.anonymous for rule in rules):
            # Nobody can log in: every client is anonymous, and no rule lets one pull.
            raise ConfigError(
                "auth.rules",
                "without auth.htpasswd every client is anonymous, and no rule names"
                " anonymous: every pull would be refused",
            )
    if rules is None and all(lists == ListsConfig() for lists in by_upstream.values()):
        return None
    return PolicyConfig(
        by_upstream=tuple(
            (name, lists) for name, lists in by_upstream.items() if name != default.registry
        ),
        default=by_upstream.get(default.registry, ListsConfig()),
        rules=rules,
    )


def policy_for_fresh_default(
    policy: PolicyConfig | None, default: UpstreamConfig, others: Sequence[UpstreamConfig]
) -> PolicyConfig | None:
    """The policy once `--upstream` replaced the file's default upstream with a fresh one:
    that upstream's allow/deny lists go with it, and every rule must still name an upstream
    there is (the check the file's rules pass)."""
    if policy is None:
        return None
    known = _known_upstreams(default, others)
    for rule in policy.rules or ():
        for glob in rule.pulls:
            head = glob.segments[0]
            if "*" not in head and head not in known:
                raise ConfigError("--upstream", f"auth.rules: {glob.text!r} names no upstream left")
    if policy.rules is None and all(lists == ListsConfig() for _, lists in policy.by_upstream):
        return None
    return replace(policy, default=ListsConfig())


def _known_upstreams(default: UpstreamConfig, others: Sequence[UpstreamConfig]) -> frozenset[str]:
    """The registry names a rule's glob may begin with."""
    return frozenset({upstream.registry for upstream in (default, *others)} | DOCKER_HUB_HOSTS)


def _upstream_entries(raw: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """{registry name: (config key, raw entry)} for every upstream entry of the file."""
    entries: dict[str, tuple[str, Mapping[str, Any]]] = {}
    single = raw.get("upstream")
    if isinstance(single, Mapping):
        url = parse_url("upstream.url", single.get("url", DEFAULT_UPSTREAM))
        entries[UpstreamConfig(url=url, name=single.get("name") or "").registry] = (
            "upstream",
            single,
        )
    for name, entry in (raw.get("upstreams") or {}).items():
        entries[entry.get("name") or str(name)] = (f"upstreams.{name}", entry)
    return entries


def _lists(key: str, entry: Mapping[str, Any]) -> ListsConfig:
    allow, deny = entry.get("allow"), entry.get("deny")
    return ListsConfig(
        allow=None if allow is None else _globs(f"{key}.allow", allow),
        deny=() if deny is None else _globs(f"{key}.deny", deny),
    )


def _globs(key: str, value: object, known: frozenset[str] | None = None) -> tuple[GlobSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list of globs, got {value!r}")
    return tuple(validate_glob(f"{key}[{i}]", item, known) for i, item in enumerate(value))


def _groups(value: object) -> dict[str, frozenset[str]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError("auth.groups", f"expected a mapping of group to users, got {value!r}")
    groups = {}
    for name, members in value.items():
        key = f"auth.groups.{name}"
        if name in RESERVED:
            raise ConfigError(key, f"{name!r} is reserved in rules and cannot name a group")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(key, f"expected a list of user names, got {members!r}")
        groups[str(name)] = frozenset(members)
    return groups


def _rules(
    value: object, groups: Mapping[str, frozenset[str]], users: set[str], known: frozenset[str]
) -> tuple[RuleConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError("auth.rules", f"expected a list of rules, got {value!r}")
    return tuple(
        _rule(f"auth.rules[{i}]", raw, groups, users, known) for i, raw in enumerate(value)
    )


def _rule(
    key: str,
    raw: object,
    groups: Mapping[str, frozenset[str]],
    users: set[str],
    known: frozenset[str],
) -> RuleConfig:
    if not isinstance(raw, Mapping) or set(raw) != {"who", "pull"}:
        raise ConfigError(key, f"expected {{who: [...], pull: [...]}}, got {raw!r}")
    who = raw["who"]
    if not isinstance(who, list) or not who or not all(isinstance(w, str) for w in who):
        raise ConfigError(f"{key}.who", f"expected a list of users and groups, got {who!r}")
    named: set[str] = set()
    for name in who:
        if name in groups:
            named |= groups[name]
        elif name in users:
            named.add(name)
        elif name not in RESERVED:
            raise ConfigError(
                f"{key}.who", f"{name!r} is no group in auth.groups and no user in auth.htpasswd"
            )
    pulls = _globs(f"{key}.pull", raw["pull"], known)
    if not pulls:
        raise ConfigError(f"{key}.pull", "expected at least one glob")
    return RuleConfig(frozenset(named), ANY_USER in who, ANONYMOUS in who, pulls)
