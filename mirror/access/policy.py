"""Pull policies: per-upstream allow/deny globs and per-user rules, compiled once at start.

The settings are checked at load (mirror/config/policy.py); this module matches requests.

Globs are `/`-separated: `*` matches within one path segment (`library/*`, `library/py*`),
a whole-segment `**` any number of segments, none included (`bitnami/**`). An optional
`:<tag glob>` or `@<digest>` ends a glob. Rule globs start with the upstream's registry
name (`docker.io/library/*`), or are `**` for everything. Names and tags are the client's
choice: matching never backtracks, its time grows linearly with the name.

A reference part restricts requests that name a reference of its kind; where a request
names none, the repository decides:
- blobs, tag lists and referrers name no tag: a tag- or digest-specific deny does not
  refuse them, and a tag-specific allow (or rule) lets them through. Blobs are shared
  between images and tags; refusing them by tag cannot be decided from the request. A
  tag list leaves out the tags its client could not pull by tag (`Policy.tag_filter`).
- a manifest by digest: a tag-specific allow (or rule) lets it through, because clients
  resolve a tag with a HEAD and then GET the manifest by digest, and the mirror cannot tell
  from which tag a digest came. The tag itself is checked when it is resolved.
- a manifest by tag against an `@digest` allow: refused (the digest is unknown before the
  tag is resolved upstream, and the policy makes no upstream request to find out).
- a manifest by tag against an `@digest` deny: let through here; once the tag is resolved,
  the pull gate asks again with the digest it resolved to (web/gate.py), so the deny
  refuses the manifest whether it is asked for by tag or by digest.
"""

from __future__ import annotations

from collections.abc import Callable
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


@dataclass(frozen=True)
class SegmentGlob:
    """One segment's glob (or a tag glob): its literal parts, split at each `*`."""

    parts: tuple[str, ...]

    def matches(self, text: str) -> bool:
        """Whether `text` is the parts with any run of characters but `/` between them.

        One pass, no backtracking: the first part is a prefix, the last a suffix, and each
        middle part is taken where it first occurs after the one before (a later place
        never leaves more room for the rest). Time grows linearly with `text`."""
        first, last = self.parts[0], self.parts[-1]
        if len(self.parts) == 1:
            return text == first
        end = len(text) - len(last)
        if "/" in text or end < len(first) or not text.startswith(first) or not text.endswith(last):
            return False
        position = len(first)
        for part in self.parts[1:-1]:
            found = text.find(part, position, end)
            if found < 0:
                return False
            position = found + len(part)
        return True


def _segment_glob(segment: str) -> SegmentGlob:
    return SegmentGlob(tuple(segment.split("*")))


@dataclass(frozen=True)
class PathGlob:
    """A path glob: segment globs, None standing for `**` (never two in a row).

    Two shortcuts for the common shapes, worked out once: the literal text every match
    starts with (most globs start with an upstream's or an organisation's name), and the
    segment globs of a glob with no `**` but maybe a last one (`docker.io/library/**`)."""

    segments: tuple[SegmentGlob | None, ...]
    prefix: str = ""
    fixed: tuple[SegmentGlob, ...] | None = None
    open_end: bool = False

    def matches(self, path: str) -> bool:
        """Whether `path` matches, segment by segment; `**` takes any number of non-empty
        segments, and `**` alone anything at all."""
        if not path.startswith(self.prefix):
            return False
        if self.segments == (None,):
            return True
        names = path.split("/")
        if self.fixed is None:
            return _spans(self.segments, names)
        count = len(self.fixed)
        if len(names) != count and not (self.open_end and len(names) > count):
            return False
        if self.open_end and "" in names[count:]:
            return False
        return all(glob.matches(name) for glob, name in zip(self.fixed, names, strict=False))


def _spans(segments: tuple[SegmentGlob | None, ...], names: list[str]) -> bool:
    """Whether `names` match `segments`, `**` among them anywhere: `reached[i]` says the
    segments so far can match the first i names. One sweep per segment, so the time is
    linear in the path for a given glob."""
    reached = [True] + [False] * len(names)
    for glob in segments:
        if glob is None:
            reached = _any_segments(names, reached)
        else:
            reached = _one_segment(glob, names, reached)
    return reached[-1]


def _path_glob(segments: list[SegmentGlob | None]) -> PathGlob:
    """The PathGlob of `segments`, with its shortcuts."""
    literal: list[str] = []
    for glob in segments:
        if glob is None:
            break
        literal.append(glob.parts[0])
        if len(glob.parts) > 1:
            break
    open_end = len(segments) > 1 and segments[-1] is None
    head = segments[:-1] if open_end else segments
    fixed = None if None in head else tuple(glob for glob in head if glob is not None)
    return PathGlob(tuple(segments), "/".join(literal), fixed, open_end)


def _one_segment(glob: SegmentGlob, names: list[str], reached: list[bool]) -> list[bool]:
    """After a segment glob: i + 1 is reached where i was and the glob matches segment i."""
    return [False] + [reached[i] and glob.matches(name) for i, name in enumerate(names)]


def _any_segments(names: list[str], reached: list[bool]) -> list[bool]:
    """After `**`: from each i reached, on over any run of non-empty segments."""
    out, going = [], False
    for i, was in enumerate(reached):
        going = was or (going and names[i - 1] != "")
        out.append(going)
    return out


@dataclass(frozen=True)
class Glob:
    """One compiled glob: path segments, and an optional tag glob or digest."""

    text: str
    path: PathGlob
    tag: SegmentGlob | None = None
    digest: str | None = None

    @property
    def names_reference(self) -> bool:
        """Whether a tag or digest part ends it: it may decide one tag unlike another."""
        return self.tag is not None or self.digest is not None

    def denies(self, path: str, reference: str | None) -> bool:
        """As a deny entry: the reference part applies only to references of its kind."""
        return self.path.matches(path) and self.denies_reference(reference)

    def grants(self, path: str, reference: str | None) -> bool:
        """As an allow entry or a rule: see the module docstring for references."""
        return self.path.matches(path) and self.grants_reference(reference)

    def denies_reference(self, reference: str | None) -> bool:
        """`denies`, for a path this glob's path matches."""
        if self.tag is not None:
            return (
                reference is not None
                and not is_digest_reference(reference)
                and self.tag.matches(reference)
            )
        if self.digest is not None:
            return reference == self.digest
        return True

    def grants_reference(self, reference: str | None) -> bool:
        """`grants`, for a path this glob's path matches."""
        if reference is None or (self.tag is None and self.digest is None):
            return True
        if self.digest is not None:
            return reference == self.digest
        assert self.tag is not None
        return is_digest_reference(reference) or self.tag.matches(reference)


def compile_glob(spec: GlobSpec) -> Glob:
    """The matcher for a checked glob."""
    compiled = [None if s == ANY_SEGMENTS else _segment_glob(s) for s in spec.segments]
    # `**/**` is `**` (alone, it matches anything): a run of them is collapsed.
    collapsed = [
        s for i, s in enumerate(compiled) if s is not None or compiled[i - 1 : i] != [None]
    ]
    return Glob(
        spec.text,
        _path_glob(collapsed),
        None if spec.tag is None else _segment_glob(spec.tag),
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

    @property
    def names_digests(self) -> bool:
        """Whether any glob has an `@digest` part: without one, the digest a tag resolves
        to is refused exactly when the tag is, so it need not be asked about."""
        lists = (self.default, *(lists for _, lists in self.by_upstream))
        globs = [glob for each in lists for glob in (*(each.allow or ()), *each.deny)]
        globs += [glob for rule in self.rules or () for glob in rule.pulls]
        return any(glob.digest is not None for glob in globs)

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

    def tag_filter(self, subject: str, target: Target) -> Callable[[str], bool] | None:
        """Which tags of `target`'s repository `subject` may pull by tag; None when no glob
        for the repository has a reference part, so every tag is decided as it is."""
        if not self._names_references(subject, target):
            return None
        # The globs whose paths match are found once: per tag, only their reference parts
        # are asked (a list of 100,000 tags is filtered on the event loop).
        lists, path = self.lists(target), target.repository
        deny = [glob for glob in lists.deny if glob.path.matches(path)]
        allow = None if lists.allow is None else [g for g in lists.allow if g.path.matches(path)]
        named = [f"{alias}/{path}" for alias in target.aliases]
        granting = (
            None
            if self.rules is None
            else [
                glob
                for rule in self.rules
                if rule.names(subject)
                for glob in rule.pulls
                if any(glob.path.matches(name) for name in named)
            ]
        )

        def may_pull(tag: str) -> bool:
            if any(glob.denies_reference(tag) for glob in deny):
                return False
            if allow is not None and not any(glob.grants_reference(tag) for glob in allow):
                return False
            return granting is None or any(glob.grants_reference(tag) for glob in granting)

        return may_pull

    def _names_references(self, subject: str, target: Target) -> bool:
        """Whether a list or rule glob that may apply to `target` has a reference part."""
        lists = self.lists(target)
        path = target.repository
        if any(g.names_reference and g.path.matches(path) for g in lists.deny):
            return True
        if any(g.names_reference and g.path.matches(path) for g in lists.allow or ()):
            return True
        paths = [f"{alias}/{path}" for alias in target.aliases]
        return any(
            glob.names_reference and glob.path.matches(named)
            for rule in self.rules or ()
            if rule.names(subject)
            for glob in rule.pulls
            for named in paths
        )


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
