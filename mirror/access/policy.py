"""Pull policies: per-upstream allow/deny globs and per-user rules, compiled once at start.

Globs are `/`-separated: `*` matches within one path segment (`library/*`, `library/py*`),
a whole-segment `**` any number of segments, none included (`bitnami/**`). An optional
`:<tag glob>` or `@<digest>` ends a glob. Rule globs start with the upstream's registry
name (`docker.io/library/*`), or are `**` for everything.

A reference part restricts requests that name a reference of its kind; where a request
names none, the repository decides:
- blobs, tag lists and referrers name no tag: a tag- or digest-specific deny does not
  refuse them, and a tag-specific allow (or rule) lets them through. Blobs are shared
  between images and tags; refusing them by tag cannot be decided from the request.
- a manifest by digest: a tag-specific allow (or rule) lets it through, because clients
  resolve a tag with a HEAD and then GET the manifest by digest, and the mirror cannot tell
  from which tag a digest came. The tag itself is checked when it is resolved.
- a manifest by tag against an `@digest` allow: refused (the digest is unknown before the
  tag is resolved upstream, and the policy makes no upstream request to find out). Docker
  and containerd GET the manifest by digest after resolving a tag, so an `@digest` deny
  stops their pulls by tag at that step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.config import (
    DEFAULT_UPSTREAM,
    DOCKER_HUB_HOSTS,
    ConfigError,
    UpstreamConfig,
    parse_url,
)
from mirror.oci.errors import DigestInvalid
from mirror.oci.reference import is_digest_reference, parse_digest

ANONYMOUS = "anonymous"
ANY_USER = "*"
RESERVED = frozenset({ANONYMOUS, ANY_USER})

_REPO_SEGMENT = re.compile(r"[a-z0-9._*-]+")
_UPSTREAM_SEGMENT = re.compile(r"[A-Za-z0-9._:*-]+")
_TAG_GLOB = re.compile(r"[A-Za-z0-9._*-]{1,128}")

# Why a pull was refused: a label of mirror_pulls_denied_total and a field of the audit line.
DENY_LIST = "deny_list"
ALLOW_LIST = "allow_list"
NO_RULE = "no_rule"


def _segment_regex(segment: str) -> str:
    return "[^/]*".join(re.escape(part) for part in segment.split("*"))


def _path_regex(segments: Sequence[str | None]) -> re.Pattern[str]:
    """One regex for a whole path glob (None stands for `**`, never two in a row)."""
    out, after_segment = "", False
    for index, segment in enumerate(segments):
        separator = "/" if after_segment else ""
        if segment is not None:
            out, after_segment = out + separator + segment, True
        elif index < len(segments) - 1:  # `a/**/z`: `a/`, then any `x/`, then `z`
            out, after_segment = out + separator + "(?:[^/]+/)*", False
        else:  # a trailing `**`: any `/x` after what came before, or anything at all
            out += "(?:/[^/]+)*" if after_segment else ".*"
    return re.compile(out)


@dataclass(frozen=True)
class Glob:
    """One compiled glob: path segments, and an optional tag glob or digest."""

    text: str
    path: re.Pattern[str]
    tag: re.Pattern[str] | None = None
    digest: str | None = None

    def denies(self, path: str, reference: str | None) -> bool:
        """As a deny entry: the reference part applies only to references of its kind."""
        if not self.path.fullmatch(path):
            return False
        if self.tag is not None:
            return (
                reference is not None
                and not is_digest_reference(reference)
                and bool(self.tag.fullmatch(reference))
            )
        if self.digest is not None:
            return reference == self.digest
        return True

    def grants(self, path: str, reference: str | None) -> bool:
        """As an allow entry or a rule: see the module docstring for references."""
        if not self.path.fullmatch(path):
            return False
        if reference is None or (self.tag is None and self.digest is None):
            return True
        if self.digest is not None:
            return reference == self.digest
        assert self.tag is not None
        return is_digest_reference(reference) or bool(self.tag.fullmatch(reference))


def parse_glob(key: str, value: object, known_upstreams: frozenset[str] | None = None) -> Glob:
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
    if at:
        try:
            parse_digest(digest)
        except DigestInvalid:
            raise ConfigError(key, f"malformed glob {value!r}: bad digest part") from None
    compiled = [_compile_segment(key, value, s, i, known_upstreams) for i, s in enumerate(segments)]
    if known_upstreams is not None and len(compiled) < 2 and compiled[0] is not None:
        raise ConfigError(key, f"malformed glob {value!r}: expected <upstream>/<repository glob>")
    # `**/**` is `**`: a run of them is collapsed, so that it cannot multiply the work.
    collapsed = [
        s for i, s in enumerate(compiled) if s is not None or compiled[i - 1 : i] != [None]
    ]
    return Glob(
        value,
        _path_regex(collapsed),
        re.compile(_segment_regex(tag)) if colon else None,
        digest if at else None,
    )


def _compile_segment(
    key: str, value: str, segment: str, index: int, known_upstreams: frozenset[str] | None
) -> str | None:
    if segment == "**":
        return None
    upstream = known_upstreams is not None and index == 0
    allowed = _UPSTREAM_SEGMENT if upstream else _REPO_SEGMENT
    if "**" in segment or not allowed.fullmatch(segment):
        raise ConfigError(key, f"malformed glob {value!r}: bad segment {segment!r}")
    if upstream and "*" not in segment and segment not in (known_upstreams or ()):
        raise ConfigError(key, f"{value!r} names no configured upstream: {segment!r}")
    return _segment_regex(segment)


@dataclass(frozen=True)
class Target:
    """What a request pulls: from which upstream, which repository, which reference."""

    upstream: str
    # Every name a rule may call the upstream by: its own, and Docker Hub's names when the
    # router sends Docker Hub requests to it.
    aliases: frozenset[str]
    default: bool
    repository: str
    reference: str | None = None  # a tag or digest; None for blobs, tag lists, referrers


@dataclass(frozen=True)
class UpstreamLists:
    """One upstream's `allow` (None: everything) and `deny` globs."""

    allow: tuple[Glob, ...] | None = None
    deny: tuple[Glob, ...] = ()

    def refusal(self, target: Target) -> str | None:
        path, reference = target.repository, target.reference
        if any(glob.denies(path, reference) for glob in self.deny):
            return DENY_LIST
        if self.allow is not None and not any(glob.grants(path, reference) for glob in self.allow):
            return ALLOW_LIST
        return None


@dataclass(frozen=True)
class Rule:
    """`{who: [...], pull: [...]}` with groups expanded to their members."""

    users: frozenset[str]
    any_user: bool
    anonymous: bool
    pulls: tuple[Glob, ...]

    def names(self, subject: str) -> bool:
        """Whether the rule is about `subject` ("" is an anonymous client)."""
        if not subject:
            return self.anonymous
        return self.any_user or subject in self.users

    def grants(self, target: Target) -> bool:
        return any(
            glob.grants(f"{alias}/{target.repository}", target.reference)
            for glob in self.pulls
            for alias in target.aliases
        )


@dataclass(frozen=True)
class Policy:
    """Every upstream's lists and the rules (None: no rules, any client may pull)."""

    by_upstream: tuple[tuple[str, UpstreamLists], ...] = ()
    default: UpstreamLists = UpstreamLists()
    rules: tuple[Rule, ...] | None = None

    @property
    def names_anonymous(self) -> bool:
        return any(rule.anonymous for rule in self.rules or ())

    def lists(self, target: Target) -> UpstreamLists:
        if target.default:
            return self.default
        return dict(self.by_upstream).get(target.upstream, UpstreamLists())

    def refusal(self, subject: str, target: Target) -> str | None:
        """Why `subject` may not pull `target` (a reason word), or None when it may."""
        reason = self.lists(target).refusal(target)
        if reason is not None:
            return reason
        if self.rules is None:
            return None
        # Rules only grant, so the first that names the subject and the target decides.
        for rule in self.rules:
            if rule.names(subject) and rule.grants(target):
                return None
        return NO_RULE


# --- parsing ---------------------------------------------------------------------------------


def parse_policy(
    raw: Mapping[str, Any], default: UpstreamConfig, others: Sequence[UpstreamConfig]
) -> Policy | None:
    """The policy of a config document (None when it sets none), after the rest of it has
    been validated: upstream entries, `auth.htpasswd`."""
    entries = _upstream_entries(raw)
    by_upstream = {name: _lists(key, entry) for name, (key, entry) in entries.items()}
    auth = raw.get("auth") or {}
    rules = None
    if auth.get("rules") is not None:
        known = frozenset({upstream.registry for upstream in (default, *others)} | DOCKER_HUB_HOSTS)
        groups = _groups(auth.get("groups"))
        rules = _rules(auth["rules"], groups, _htpasswd_users(auth.get("htpasswd")), known)
        if auth.get("anonymous_pull") is False and any(rule.anonymous for rule in rules):
            raise ConfigError(
                "auth.rules", "a rule names anonymous but auth.anonymous_pull is false"
            )
    if rules is None and all(lists == UpstreamLists() for lists in by_upstream.values()):
        return None
    return Policy(
        by_upstream=tuple(
            (name, lists) for name, lists in by_upstream.items() if name != default.registry
        ),
        default=by_upstream.get(default.registry, UpstreamLists()),
        rules=rules,
    )


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


def _lists(key: str, entry: Mapping[str, Any]) -> UpstreamLists:
    allow, deny = entry.get("allow"), entry.get("deny")
    return UpstreamLists(
        allow=None if allow is None else _globs(f"{key}.allow", allow),
        deny=() if deny is None else _globs(f"{key}.deny", deny),
    )


def _globs(key: str, value: object, known: frozenset[str] | None = None) -> tuple[Glob, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list of globs, got {value!r}")
    return tuple(parse_glob(f"{key}[{i}]", item, known) for i, item in enumerate(value))


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
) -> tuple[Rule, ...]:
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
) -> Rule:
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
    return Rule(frozenset(named), ANY_USER in who, ANONYMOUS in who, pulls)


def _htpasswd_users(path: object) -> set[str]:
    """The user names in the htpasswd file (read once, for checking the rules' names)."""
    if path is None:
        return set()
    try:
        lines = Path(str(path)).read_text().splitlines()
    except OSError as exc:
        raise ConfigError("auth.htpasswd", f"cannot read {str(path)!r}: {exc.strerror}") from None
    return {line.partition(":")[0].strip() for line in lines if ":" in line}
