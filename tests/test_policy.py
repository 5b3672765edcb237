"""Pull policies, without a server: the glob matcher, the rules, and config errors (exit 2)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from mirror.access.policy import (
    ALLOW_LIST,
    DENY_LIST,
    NO_RULE,
    Policy,
    Target,
    compile_policy,
    parse_glob,
)
from mirror.config import ConfigError, config_from_mapping
from mirror.oci.errors import DigestInvalid
from mirror.oci.reference import parse_digest
from tests.test_config import run_cli, write

DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "b" * 64


def grants(glob: str, repository: str, reference: str | None = None) -> bool:
    return parse_glob("g", glob).grants(repository, reference)


def denies(glob: str, repository: str, reference: str | None = None) -> bool:
    return parse_glob("g", glob).denies(repository, reference)


# --- globs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "repository", "matches"),
    [
        ("library/*", "library/nginx", True),
        ("library/*", "library/nginx/extra", False),  # * is one segment
        ("library/*", "library", False),
        ("library/*", "bitnami/nginx", False),
        ("library/py*", "library/python", True),
        ("library/py*", "library/nginx", False),
        ("*/nginx", "library/nginx", True),
        ("bitnami/**", "bitnami/redis", True),
        ("bitnami/**", "bitnami/charts/redis", True),  # ** any number of segments
        ("bitnami/**", "bitnami", True),  # none included
        ("bitnami/**", "bitnamix/redis", False),
        ("**/redis", "a/b/c/redis", True),
        ("**/redis", "redis", True),
        ("a/**/z", "a/z", True),
        ("a/**/z", "a/b/c/z", True),
        ("a/**/z", "a/b/c/y", False),
        ("a/**/**/**/z", "a/z", True),  # a run of ** is one
        ("a/**/b/**", "a/x/b/y/z", True),
        ("a/**/b/**", "a/b", True),
        ("a/**/b/**", "a/x/c", False),
        ("a/**/**/**/z", "a/b/c/d/e/z", True),
        ("**", "any/thing/at/all", True),
        ("library/nginx", "library/nginx", True),
        ("library/nginx", "library/nginxx", False),
        ("library/ng.nx", "library/ngxnx", False),  # a dot is a dot, not a wildcard
        ("library/*-*-*", "library/a-b-c", True),  # several stars in one segment
        ("library/*-*-*", "library/--", True),
        ("library/*-*-*", "library/a-b", False),
        ("library/*-*-*", "library/a-b-c/d", False),
        ("library/ab*ba", "library/abba", True),
        ("library/ab*ba", "library/aba", False),  # the prefix and suffix may not overlap
        ("library/py*on*", "library/python", True),
        ("library/py*on*", "library/pyth", False),
        ("**", "", True),
    ],
)
def test_glob_paths(glob: str, repository: str, matches: bool) -> None:
    assert grants(glob, repository) is matches
    assert denies(glob, repository) is matches


def test_a_tag_part_in_a_deny_refuses_only_those_tags() -> None:
    glob = "library/*:latest-rc*"
    assert denies(glob, "library/nginx", "latest-rc1")
    assert not denies(glob, "library/nginx", "latest")
    assert not denies(glob, "library/nginx", DIGEST)  # by digest: the tag is unknown
    assert not denies(glob, "library/nginx", None)  # blobs, tag lists: no tag
    assert not denies(glob, "bitnami/nginx", "latest-rc1")


def test_a_tag_part_in_an_allow_restricts_tags_but_not_digests_or_blobs() -> None:
    glob = "library/nginx:1.*"
    assert grants(glob, "library/nginx", "1.27")
    assert not grants(glob, "library/nginx", "latest")
    # Clients resolve a tag (checked then), and GET the manifest by digest: allowed.
    assert grants(glob, "library/nginx", DIGEST)
    assert grants(glob, "library/nginx", None)
    assert not grants(glob, "library/redis", None)


def test_a_digest_part() -> None:
    glob = f"library/nginx@{DIGEST}"
    assert denies(glob, "library/nginx", DIGEST)
    assert not denies(glob, "library/nginx", OTHER_DIGEST)
    assert not denies(glob, "library/nginx", "latest")
    assert not denies(glob, "library/nginx", None)
    assert grants(glob, "library/nginx", DIGEST)
    assert not grants(glob, "library/nginx", OTHER_DIGEST)
    assert not grants(glob, "library/nginx", "latest")  # unknown before resolving it
    assert grants(glob, "library/nginx", None)


def test_several_stars_in_a_tag_part() -> None:
    assert denies("library/*:*-rc*-*", "library/nginx", "1.2-rc1-alpine")
    assert not denies("library/*:*-rc*-*", "library/nginx", "1.2-rc1")
    assert grants("library/nginx:1.*.*", "library/nginx", "1.27.3")
    assert not grants("library/nginx:1.*.*", "library/nginx", "1.27")


def test_glob_matching_takes_time_linear_in_the_name() -> None:
    """Names a backtracking matcher takes cubic time over (each star of `*-*-*` tried at
    every dash): 5000 characters must be decided at once, right."""
    rule = parse_glob("auth.rules[0].pull[0]", "docker.io/library/*-*-*", frozenset({"docker.io"}))
    dashes = "-" * 5000
    cases = [
        (rule, f"docker.io/library/{dashes}/x", None, False),
        (rule, f"docker.io/library/{dashes}", None, True),
        (parse_glob("g", "library/*:*-*-*x"), "library/nginx", dashes, False),
    ]
    for glob, path, reference, expected in cases:
        started = time.perf_counter()
        assert glob.grants(path, reference) is expected
        # Cubic took 157 s for the first; linear takes a millisecond: the bound is for a
        # loaded machine, not a measure.
        assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    "glob",
    [
        "",
        "library//nginx",
        "library/ng**x",
        "Library/nginx",  # repository names are lower case
        "library/ng?nx",
        "library/[a-z]*",
        "library/nginx:",
        "library/nginx:bad tag",
        "library/nginx@sha256:short",
        "library/nginx@",
        "library/ nginx",
    ],
)
def test_malformed_globs(glob: str) -> None:
    with pytest.raises(ConfigError, match="malformed glob"):
        parse_glob("upstreams.docker.io.deny[0]", glob)


@pytest.mark.parametrize(
    "digest",
    [
        DIGEST,
        "sha512:" + "c" * 128,
        "sha256:" + "A" * 64,  # upper-case hex
        "sha256:" + "a" * 63,
        "sha512:" + "c" * 64,
        "sha384:" + "a" * 96,  # an algorithm the mirror does not take
        "sha256" + "a" * 64,
    ],
)
def test_glob_digest_parts_follow_the_reference_grammar(digest: str) -> None:
    """The config restates the digest grammar of mirror/oci/reference.py: the two agree."""
    try:
        parse_digest(digest)
        valid = True
    except DigestInvalid:
        valid = False
    try:
        parse_glob("g", f"library/nginx@{digest}")
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted is valid


def test_rule_globs_name_a_known_upstream() -> None:
    known = frozenset({"docker.io", "ghcr.io"})
    assert parse_glob("k", "ghcr.io/owner/*", known).grants("ghcr.io/owner/x", None)
    assert parse_glob("k", "*/library/*", known).grants("ghcr.io/library/x", None)
    assert parse_glob("k", "**", known).grants("ghcr.io/library/x", None)
    assert not parse_glob("k", "docker.io/**", known).grants("ghcr.io/library/x", None)
    with pytest.raises(ConfigError, match="names no configured upstream: 'quay.io'"):
        parse_glob("auth.rules[0].pull[0]", "quay.io/owner/*", known)
    with pytest.raises(ConfigError, match="expected <upstream>/<repository glob>"):
        parse_glob("auth.rules[0].pull[0]", "docker.io", known)


# --- the policy from a config -------------------------------------------------------------------


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path.write_text("".join(f"{user}:{hashed}\n" for user in ("alice", "bob", "carol")))
    return path


def policy_of(raw: dict[str, Any]) -> Policy:
    settings = config_from_mapping(raw).policy
    assert settings is not None
    return compile_policy(settings)


def hub(repository: str, reference: str | None = None, default: bool = True) -> Target:
    return Target("docker.io", frozenset({"docker.io"}), default, repository, reference)


def ghcr(repository: str, reference: str | None = None) -> Target:
    return Target("ghcr.io", frozenset({"ghcr.io"}), False, repository, reference)


ISSUE_CONFIG: dict[str, Any] = {
    "upstreams": {
        "docker.io": {
            "url": "https://registry-1.docker.io",
            "allow": ["library/*", "bitnami/**"],
            "deny": ["library/*:latest-rc*"],
        },
        "ghcr.io": {"url": "https://ghcr.io"},
    },
}


def with_rules(htpasswd: Path, rules: list[Any], **auth: Any) -> dict[str, Any]:
    groups = {"platform": ["alice", "ci-bot"]}
    return {
        **ISSUE_CONFIG,
        "auth": {"htpasswd": str(htpasswd), "groups": groups, "rules": rules, **auth},
    }


def test_no_policy_keys_no_policy() -> None:
    assert config_from_mapping({"upstreams": {"docker.io": {}}}).policy is None


def test_upstream_lists_deny_wins_and_null_allow_is_everything() -> None:
    policy = policy_of(ISSUE_CONFIG)
    assert policy.refusal("", hub("library/nginx", "latest")) is None
    assert policy.refusal("", hub("bitnami/charts/redis", "7")) is None
    assert policy.refusal("", hub("library/nginx", "latest-rc2")) == DENY_LIST
    assert policy.refusal("", hub("library/nginx", None)) is None
    assert policy.refusal("", hub("someone/app", "v1")) == ALLOW_LIST
    assert policy.refusal("", hub("someone/app", None)) == ALLOW_LIST
    assert policy.refusal("", ghcr("someone/app", "v1")) is None  # no allow list: all
    both = policy_of({"upstreams": {"docker.io": {"allow": ["library/*"], "deny": ["library/*"]}}})
    assert both.refusal("", hub("library/nginx")) == DENY_LIST


def test_the_single_upstream_entry_takes_lists_too() -> None:
    policy = policy_of({"upstream": {"url": "http://127.0.0.1:5000", "deny": ["secret/**"]}})
    target = Target("127.0.0.1:5000", frozenset({"127.0.0.1:5000"}), True, "secret/x", None)
    assert policy.refusal("", target) == DENY_LIST


def test_rules_per_user_group_any_user_and_anonymous(htpasswd: Path) -> None:
    rules = [
        {"who": ["platform"], "pull": ["**"]},
        {"who": ["bob"], "pull": ["ghcr.io/team/*"]},
        {"who": ["*"], "pull": ["docker.io/library/*"]},
        {"who": ["anonymous"], "pull": ["docker.io/library/busybox"]},
    ]
    policy = policy_of(with_rules(htpasswd, rules))
    assert policy.names_anonymous
    private = ghcr("team/app", "v1")
    # alice is in the platform group: everything the upstream lists allow.
    assert policy.refusal("alice", private) is None
    assert policy.refusal("alice", hub("bitnami/redis", "7")) is None
    assert policy.refusal("alice", hub("library/nginx", "latest-rc1")) == DENY_LIST  # lists first
    # bob, by name, and as any authenticated user.
    assert policy.refusal("bob", private) is None
    assert policy.refusal("bob", ghcr("other/app", "v1")) == NO_RULE
    assert policy.refusal("bob", hub("library/nginx", "latest")) is None
    assert policy.refusal("bob", hub("bitnami/redis", "7")) == NO_RULE
    # carol: only what "*" grants.
    assert policy.refusal("carol", private) == NO_RULE
    assert policy.refusal("carol", hub("library/nginx", "latest")) is None
    # Anonymous clients: only their own rule ("*" means an authenticated user).
    assert policy.refusal("", hub("library/busybox", "latest")) is None
    assert policy.refusal("", hub("library/nginx", "latest")) == NO_RULE
    assert policy.refusal("", private) == NO_RULE


def test_docker_hub_names_in_rules_follow_the_router(htpasswd: Path) -> None:
    """`docker.io/...` in a rule means whatever upstream the router sends Docker Hub to."""
    raw = {
        "upstream": {"url": "http://127.0.0.1:5000"},
        "auth": {"htpasswd": str(htpasswd), "rules": [{"who": ["*"], "pull": ["docker.io/a/*"]}]},
    }
    policy = policy_of(raw)
    aliases = frozenset({"127.0.0.1:5000", "docker.io", "index.docker.io"})
    assert policy.refusal("bob", Target("127.0.0.1:5000", aliases, True, "a/b", "1")) is None
    alone = frozenset({"127.0.0.1:5000"})
    assert policy.refusal("bob", Target("127.0.0.1:5000", alone, True, "a/b", "1")) == NO_RULE


def test_a_tag_filter_only_where_a_glob_for_the_repository_names_a_reference(
    htpasswd: Path,
) -> None:
    rules = [
        {"who": ["bob"], "pull": ["docker.io/library/*:v*", "ghcr.io/team/*"]},
        {"who": ["carol"], "pull": ["docker.io/library/**", "ghcr.io/**"]},
    ]
    policy = policy_of(with_rules(htpasswd, rules))
    # The list's deny `library/*:latest-rc*` is for everyone; bob's rule narrows his tags.
    for subject, shown in (("carol", ["latest", "v1"]), ("bob", ["v1"])):
        allowed = policy.tag_filter(subject, hub("library/nginx"))
        assert allowed is not None
        assert [t for t in ("latest", "latest-rc1", "v1") if allowed(t)] == shown
    # No glob with a tag or digest part applies: every tag is decided as the repository is.
    assert policy.tag_filter("bob", ghcr("team/app")) is None
    assert policy.tag_filter("carol", hub("bitnami/redis")) is None
    pinned = policy_of({"upstreams": {"docker.io": {"allow": [f"a/b@sha256:{'1' * 64}"]}}})
    allowed = pinned.tag_filter("", hub("a/b"))
    assert allowed is not None and not allowed("v1")  # by tag, a digest allow refuses


def test_no_rule_matches_denied(htpasswd: Path) -> None:
    policy = policy_of(with_rules(htpasswd, []))
    assert policy.refusal("alice", hub("library/nginx", "latest")) == NO_RULE


@pytest.mark.parametrize(
    ("rules", "auth", "key", "message"),
    [
        (
            [{"who": ["platfrom"], "pull": ["**"]}],
            {},
            "auth.rules[0].who",
            "'platfrom' is no group",
        ),
        ([{"who": ["*"], "pull": ["quay.io/x/*"]}], {}, "auth.rules[0].pull[0]", "'quay.io'"),
        ([{"who": ["*"], "pull": ["docker.io/x//y"]}], {}, "auth.rules[0].pull[0]", "malformed"),
        ([{"who": ["*"], "pull": "**"}], {}, "auth.rules[0].pull", "expected a list"),
        ([{"who": ["*"], "pull": []}], {}, "auth.rules[0].pull", "at least one"),
        ([{"who": [], "pull": ["**"]}], {}, "auth.rules[0].who", "expected a list"),
        ([{"who": ["*"], "pull": ["**"], "push": ["**"]}], {}, "auth.rules[0]", "expected {who"),
        ({"who": ["*"]}, {}, "auth.rules", "expected a list of rules"),
        (
            [{"who": ["anonymous"], "pull": ["**"]}],
            {"anonymous_pull": False},
            "auth.rules",
            "false",
        ),
    ],
)
def test_bad_rules_name_the_key(
    htpasswd: Path, rules: Any, auth: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(with_rules(htpasswd, rules, **auth))
    assert caught.value.key == key
    assert message in str(caught.value)


def test_rules_without_htpasswd_must_let_anonymous_clients_pull() -> None:
    """Without an htpasswd file nobody logs in: rules naming only users (`*`) refused
    every pull with 403 no_rule, a config error nobody would see until the first pull."""
    only_users = {"auth": {"rules": [{"who": ["*"], "pull": ["**"]}]}}
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(only_users)
    assert caught.value.key == "auth.rules"
    assert "every client is anonymous" in str(caught.value)
    anonymous = {"auth": {"rules": [{"who": ["anonymous"], "pull": ["docker.io/library/*"]}]}}
    assert policy_of(anonymous).refusal("", hub("library/nginx", "1")) is None  # "": anonymous


def test_bad_groups_name_the_key(htpasswd: Path) -> None:
    raw = with_rules(htpasswd, [{"who": ["*"], "pull": ["**"]}])
    for groups, key in (
        ({"anonymous": ["alice"]}, "auth.groups.anonymous"),
        ({"ops": "alice"}, "auth.groups.ops"),
        (["alice"], "auth.groups"),
    ):
        with pytest.raises(ConfigError) as caught:
            config_from_mapping({**raw, "auth": {**raw["auth"], "groups": groups}})
        assert caught.value.key == key


def test_bad_upstream_lists_name_the_key() -> None:
    for entry, key in (
        ({"allow": "library/*"}, "upstreams.docker.io.allow"),
        ({"deny": ["library/Nginx"]}, "upstreams.docker.io.deny[0]"),
        ({"allow": ["ok/*", "library/**x"]}, "upstreams.docker.io.allow[1]"),
    ):
        with pytest.raises(ConfigError) as caught:
            config_from_mapping({"upstreams": {"docker.io": entry}})
        assert caught.value.key == key


@pytest.mark.parametrize(
    ("auth", "shown"),
    [
        ('  rules:\n    - {who: [platfrom], pull: ["**"]}\n', "'platfrom'"),
        ('  rules:\n    - {who: ["*"], pull: ["quay.io/a/*"]}\n', "'quay.io'"),
        ('  rules:\n    - {who: ["*"], pull: ["docker.io/a/**b"]}\n', "malformed glob"),
    ],
)
async def test_cli_bad_rule_exits_2_naming_it(
    tmp_path: Path, htpasswd: Path, auth: str, shown: str
) -> None:
    storage = tmp_path / "store"
    text = (
        f"storage:\n  path: {storage}\nupstreams:\n  docker.io: {{}}\n"
        f"auth:\n  htpasswd: {htpasswd}\n{auth}"
    )
    result = run_cli("serve", "--config", str(write(tmp_path, text)))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "auth.rules[0]" in lines[0] and shown in lines[0], lines
    assert not storage.exists()
