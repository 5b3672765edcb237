"""Pull policies: per-upstream allow/deny globs and per-user rules, compiled once at start.

The settings are checked at load (mirror/config/policy.py); this module matches requests.

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
from collections.abc import Sequence
from dataclasses import dataclass

from mirror.config.policy import (
    ANY_SEGMENTS,
    GlobSpec,
    ListsConfig,
    PolicyConfig,
    RuleConfig,
    validate_glob,
)
from mirror.oci.reference import is_digest_reference

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


def compile_glob(spec: GlobSpec) -> Glob:
    """The matcher for a checked glob."""
    compiled = [None if s == ANY_SEGMENTS else _segment_regex(s) for s in spec.segments]
    # `**/**` is `**`: a run of them is collapsed, so that it cannot multiply the work.
    collapsed = [
        s for i, s in enumerate(compiled) if s is not None or compiled[i - 1 : i] != [None]
    ]
    return Glob(
        spec.text,
        _path_regex(collapsed),
        None if spec.tag is None else re.compile(_segment_regex(spec.tag)),
        spec.digest,
    )


def parse_glob(key: str, value: object, known_upstreams: frozenset[str] | None = None) -> Glob:
    """A glob from the config, checked (ConfigError naming `key`) and compiled."""
    return compile_glob(validate_glob(key, value, known_upstreams))


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


# --- compiling ---------------------------------------------------------------------------------


def compile_policy(spec: PolicyConfig) -> Policy:
    """The matcher for a checked policy: built once, when the app is created."""
    return Policy(
        by_upstream=tuple((name, _compile_lists(lists)) for name, lists in spec.by_upstream),
        default=_compile_lists(spec.default),
        rules=None if spec.rules is None else tuple(_compile_rule(r) for r in spec.rules),
    )


def _compile_lists(spec: ListsConfig) -> UpstreamLists:
    return UpstreamLists(
        allow=None if spec.allow is None else tuple(compile_glob(g) for g in spec.allow),
        deny=tuple(compile_glob(g) for g in spec.deny),
    )


def _compile_rule(spec: RuleConfig) -> Rule:
    pulls = tuple(compile_glob(g) for g in spec.pulls)
    return Rule(spec.users, spec.any_user, spec.anonymous, pulls)
