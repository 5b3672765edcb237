"""Configuration: durations, validation messages, secrets, precedence, and the CLI's exit 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mirror.access.clientauth import load_signing_key
from mirror.config import (
    DEFAULT_UPSTREAM,
    Config,
    ConfigError,
    apply_overrides,
    config_from_mapping,
    load_config,
    parse_duration,
)
from mirror.config.upstreams import UpstreamConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-Hub-PAT-do-not-print"


def write(tmp_path: Path, text: str, name: str = "mirror.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(raw: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw)
    return info.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m mirror ...`; a timeout fails the test if a server did start."""
    environ = {k: v for k, v in os.environ.items() if k != "MIRROR_CONFIG"}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# --- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("2h", 7200), ("7d", 604800), ("1w", 604800), ("500ms", 0.5)],
)
async def test_duration_units(text: str, seconds: float) -> None:
    assert parse_duration("k", text) == seconds


@pytest.mark.parametrize("value", [45, 45.5, "45", " 45 "])
async def test_duration_plain_number_is_seconds(value: object) -> None:
    assert parse_duration("k", value) == float(str(value).strip())


@pytest.mark.parametrize("value", ["ten", "10x", "m10", "", "1 0s", "-5s", True, None, [1]])
async def test_duration_bad_values_name_key_and_value(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration("cache.tag_ttl", value)
    assert info.value.key == "cache.tag_ttl"
    assert "cache.tag_ttl" in str(info.value)
    assert repr(value) in str(info.value)


async def test_duration_negative_number_rejected() -> None:
    with pytest.raises(ConfigError, match="negative"):
        parse_duration("k", -5)


@pytest.mark.parametrize("name", ["connect_timeout", "read_timeout"])
@pytest.mark.parametrize("section", ["upstream", "upstreams.ghcr"])
async def test_upstream_timeouts_must_be_more_than_zero(section: str, name: str) -> None:
    entry = {name: "0s"}
    raw = {"upstream": entry} if section == "upstream" else {"upstreams": {"ghcr": entry}}
    err = config_error(raw)
    assert err.key == f"{section}.{name}"
    assert "more than 0" in str(err)


async def test_tag_ttl_duration_from_mapping() -> None:
    assert config_from_mapping({"cache": {"tag_ttl": "10m"}}).cache.tag_ttl == 600
    config = config_from_mapping({"upstream": {"connect_timeout": "2s", "read_timeout": 90}})
    assert (config.upstream.connect_timeout, config.upstream.read_timeout) == (2, 90)


# --- unknown keys and wrong types ----------------------------------------------------------


async def test_unknown_top_level_key_named() -> None:
    err = config_error({"listen_port": 8083})
    assert err.key == "listen_port"
    assert "listen_port: unknown key" in str(err)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"cache": {"tagttl": "1m"}}, "cache.tagttl"),
        ({"upstream": {"user": "u"}}, "upstream.user"),
        ({"storage": {"dir": "/x"}}, "storage.dir"),
        ({"redis": {"host": "localhost"}}, "redis.host"),
        ({"log": {"colour": "json"}}, "log.colour"),
    ],
)
async def test_unknown_nested_key_named_with_section(raw: dict[str, Any], key: str) -> None:
    err = config_error(raw)
    assert err.key == key
    assert f"{key}: unknown key" in str(err)


@pytest.mark.parametrize(
    ("raw", "key", "shown"),
    [
        ({"cache": "10m"}, "cache", "got a str"),  # a section: its type only
        ({"upstream": ["https://x"]}, "upstream", "got a list"),
        ({"listen": 8083}, "listen", "'8083'"),
        ({"listen": "localhost:http"}, "listen", "'localhost:http'"),
        ({"listen": "0.0.0.0:70000"}, "listen", "'0.0.0.0:70000'"),
        ({"listen": "0.0.0.0:\u00b2"}, "listen", "'0.0.0.0:\u00b2'"),  # isdigit, not int
        ({"listen": "0.0.0.0:" + "9" * 5000}, "listen", "'0.0.0.0:999"),  # past int()'s limit
        ({"upstream": {"username": 42}}, "upstream.username", "42"),
        ({"upstream": {"connect_timeout": True}}, "upstream.connect_timeout", "True"),
        ({"cache": {"tag_ttl": [10]}}, "cache.tag_ttl", "[10]"),
        ({"log": {"level": "loud"}}, "log.level", "'loud'"),
    ],
)
async def test_wrong_type_names_key_and_value(raw: dict[str, Any], key: str, shown: str) -> None:
    err = config_error(raw)
    assert err.key == key
    assert str(err).startswith(f"config: {key}: ")
    assert shown.lower() in str(err).lower()


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"redis": f"redis://:{SECRET}@redis:6379"}, "redis"),  # `url:` forgotten
        ({"upstream": f"https://bob:{SECRET}@registry.example.com"}, "upstream"),
        ({"upstreams": {"ghcr.io": f"https://bob:{SECRET}@ghcr.io"}}, "upstreams.ghcr.io"),
        ({"upstreams": f"https://bob:{SECRET}@ghcr.io"}, "upstreams"),
        ({"storage": {"s3": f"https://key:{SECRET}@s3.example"}}, "storage.s3"),
        ({"tls": SECRET}, "tls"),
    ],
)
async def test_a_section_of_the_wrong_type_is_named_by_its_type_alone(
    raw: dict[str, Any], key: str
) -> None:
    """A section holding a string may hold a secret put in the wrong place."""
    err = config_error(raw)
    assert err.key == key
    assert SECRET not in str(err)
    assert "got a str" in str(err)


async def test_non_string_password_error_does_not_echo_it() -> None:
    # YAML reads `password: 20240101` as an int: the error must still not print the secret.
    err = config_error({"upstream": {"username": "u", "password": 20240101}})
    assert err.key == "upstream.password"
    assert "20240101" not in str(err)


@pytest.mark.parametrize(
    "url", ["registry-1.docker.io", "ftp://registry.example", "https://", "redis://localhost"]
)
async def test_bad_upstream_url(url: str) -> None:
    err = config_error({"upstream": {"url": url}})
    assert err.key == "upstream.url"
    assert repr(url) in str(err)


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "redis//x", ""])
async def test_bad_redis_url(url: str) -> None:
    err = config_error({"redis": {"url": url}})
    assert err.key == "redis.url"
    assert repr(url) in str(err)


@pytest.mark.parametrize(
    ("url", "option"),
    [
        ("redis://redis:6379/0?bogus=1", "bogus"),
        (f"redis://:{SECRET}@redis/0?ssl_ca_certs=/ca.pem", "ssl_ca_certs"),  # rediss:// meant
    ],
)
async def test_a_redis_url_option_redis_py_does_not_take_is_refused_at_load(
    url: str, option: str
) -> None:
    """redis-py passes any query key on to its connection, which then fails every command:
    every manifest request was a 500 while the metadata store counted as up."""
    err = config_error({"redis": {"url": url}})
    assert err.key == "redis.url"
    assert repr(option) in str(err) and SECRET not in str(err)


@pytest.mark.parametrize(
    "url", ["redis://r?socket_timeout=5&health_check_interval=10", "rediss://r?ssl_ca_certs=/ca"]
)
async def test_the_options_redis_py_takes_load(url: str) -> None:
    assert config_from_mapping({"redis": {"url": url}}).redis.url == url


@pytest.mark.parametrize(
    "value", [{"host": "h", "password": SECRET}, f"redis://{SECRET}@h:99999", [SECRET]]
)
async def test_a_bad_redis_url_never_shows_its_password(value: object) -> None:
    err = config_error({"redis": {"url": value}})
    assert err.key == "redis.url"
    assert SECRET not in str(err)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"upstream": {"url": "https://[::1"}}, "upstream.url"),
        ({"public_url": "https://[fe80::1/"}, "public_url"),
        ({"storage": {"s3": {"endpoint": "http://[::1", "bucket": "b1b"}}}, "storage.s3.endpoint"),
    ],
)  # fmt: skip
async def test_an_unclosed_ipv6_bracket_is_a_config_error(raw: dict[str, Any], key: str) -> None:
    assert config_error(raw).key == key


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"upstream": {"username": "u", "password_file": "{}"}}, "upstream.password_file"),
        (
            {"storage": {"s3": {"bucket": "cache", "access_key_id": "k",
                                "secret_access_key_file": "{}"}}},
            "storage.s3.secret_access_key_file",
        ),
    ],
)  # fmt: skip
async def test_a_secret_file_that_is_not_text_names_its_key(
    tmp_path: Path, section: dict[str, Any], key: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"\xff\xfe" + SECRET.encode())
    raw = json.loads(json.dumps(section).replace("{}", str(secret)))
    err = config_error(raw)
    assert err.key == key and "not UTF-8" in str(err) and SECRET not in str(err)


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        (b"alice:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/\n", "line 2 ('alice')"),  # htpasswd's MD5
        (b"alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "line 2 ('alice')"),
        (b"alice:\xff\xfe\n", "not UTF-8"),
    ],
)
async def test_an_htpasswd_line_the_mirror_cannot_check_stops_it_at_load(
    tmp_path: Path, line: bytes, shown: str
) -> None:
    """Apache's htpasswd makes MD5 unless told -B: such a user could never log in, and the
    rules were checked against the name all the same."""
    bcrypt_line = b"bob:$2b$04$" + b"a" * 53 + b"\n"
    path = tmp_path / "htpasswd"
    path.write_bytes(bcrypt_line + line)
    err = config_error({"auth": {"htpasswd": str(path)}})
    assert err.key == "auth.htpasswd" and shown in str(err)
    assert "HqJZ" not in str(err) and "W6ph" not in str(err)


async def test_a_signing_key_that_cannot_be_created_names_its_key(tmp_path: Path) -> None:
    """A read-only or full cache disk: one line, not a traceback (nor a worker restarted
    over and over)."""
    (tmp_path / "a-file").write_text("")  # root writes anywhere: a file where a directory goes
    for path in (Path("/proc/mirror-test/signing.key"), tmp_path / "a-file" / "auth" / "key"):
        with pytest.raises(ConfigError) as info:
            load_signing_key(path)
        assert info.value.key == "auth.signing_key_file" and str(path) in str(info.value)


async def test_several_upstreams_without_docker_hub_need_a_default_named() -> None:
    """The key the user did not write is the one to set, and the message says why."""
    raw = {"upstreams": {"a": {"url": "https://ghcr.io"}, "b": {"url": "https://quay.io"}}}
    err = config_error(raw)
    assert err.key == "default_upstream"
    assert "required with several upstreams and none for docker.io" in str(err)


async def test_a_config_nested_past_the_parsers_stack_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "--config" and "nested too deeply" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"upstream": {"url": "http://127.0.0.1:99999"}}, "upstream.url"),
        ({"upstreams": {"q": {"url": "https://quay.io:abc"}}}, "upstreams.q.url"),
        ({"public_url": "https://mirror.example:0"}, "public_url"),
        (
            {"cluster": {"advertise_url": "http://10.0.0.5:70000", "secret_file": "/s"}},
            "cluster.advertise_url",
        ),
        ({"storage": {"s3": {"endpoint": "http://r:x", "bucket": "cache"}}}, "storage.s3.endpoint"),
    ],
)  # fmt: skip
async def test_a_url_with_a_bad_port_is_refused_at_load(raw: dict[str, Any], key: str) -> None:
    """Else it started, answered /readyz, and failed every request to that URL."""
    err = config_error(raw)
    assert (err.key, "port from 1 to 65535" in str(err)) == (key, True)
    with pytest.raises(ConfigError) as flag:
        apply_overrides(Config(), upstream="http://127.0.0.1:99999")
    assert flag.value.key == "--upstream"


async def test_good_urls_accepted_without_trailing_slash() -> None:
    config = config_from_mapping(
        {"upstream": {"url": "https://ghcr.io/"}, "redis": {"url": "redis://127.0.0.1:6379/0"}}
    )
    assert config.upstream.url == "https://ghcr.io"
    assert config.redis.url == "redis://127.0.0.1:6379/0"


# --- files ----------------------------------------------------------------------------------


async def test_no_file_gives_defaults() -> None:
    assert load_config(None) == Config()


async def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


async def test_missing_file_is_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.key == "--config"
    assert str(missing) in str(info.value)


async def test_directory_as_file_is_config_error(tmp_path: Path) -> None:
    # Tests run as root, so a chmod 000 file would still be readable; a directory is not.
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


async def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 0.0.0.0:8083\ncache:\n  tag_ttl: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line") as info:
        load_config(path)
    assert info.value.key == "--config"


async def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- listen\n- upstream\n"))
    # --config pointed at a secret (an htpasswd file): its text is not printed.
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"bob:$2y$05${SECRET}\n"))
    assert SECRET not in str(info.value) and "got a str" in str(info.value)


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("storage:\n  max_size: 10GiB\nlisten: :8083\nstorage:\n  path: /x\n", "storage", (1, 4)),
        ("cache:\n  tag_ttl: 1m\n  negative_ttl: 1s\n  tag_ttl: 2h\n", "tag_ttl", (2, 4)),
        ("upstreams:\n  q:\n    auth_hosts:\n      - {a: 1, a: 2}\n", "a", (4, 4)),
    ],
)  # fmt: skip
async def test_a_key_given_twice_is_refused(
    tmp_path: Path, text: str, key: str, lines: tuple[int, int]
) -> None:
    """YAML would keep the last: a second `storage:` silently dropped the first's max_size."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert str(info.value) == f"config: {key}: given twice (lines {lines[0]} and {lines[1]})"


async def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = (
        "upstream: {}\nupstreams:\n  a.example: &base\n    url: https://a.example\n"
        "    read_timeout: 9s\n  b.example:\n    <<: *base\n    url: https://b.example\n"
    )
    b = load_config(write(tmp_path, text)).upstreams[1]
    assert (b.url, b.read_timeout) == ("https://b.example", 9)


async def test_password_file_is_read_and_stripped(tmp_path: Path) -> None:
    secret = write(tmp_path, SECRET + "\n", name="password")
    path = write(tmp_path, f"upstream:\n  username: u\n  password_file: {secret}\n")
    assert load_config(path).upstream.password == SECRET


async def test_two_password_sources_conflict(tmp_path: Path) -> None:
    secret = write(tmp_path, SECRET, name="password")
    err = config_error({"upstream": {"password": "inline", "password_file": str(secret)}})
    assert err.key == "upstream.password_file"
    assert "inline" not in str(err) and SECRET not in str(err)


async def test_unreadable_password_file_names_key(tmp_path: Path) -> None:
    err = config_error({"upstream": {"password_file": str(tmp_path / "missing")}})
    assert err.key == "upstream.password_file"


async def test_repr_never_shows_password(tmp_path: Path) -> None:
    secret = write(tmp_path, SECRET, name="password")
    path = write(tmp_path, f"upstream:\n  username: u\n  password_file: {secret}\n")
    config = load_config(path)
    assert config.upstream.password == SECRET
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert SECRET not in repr(config.upstream)
    inline = config_from_mapping({"upstream": {"username": "u", "password": SECRET}})
    assert SECRET not in repr(inline)


# --- precedence -----------------------------------------------------------------------------


async def test_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listen: 127.0.0.1:9000\n"
        "upstream:\n  url: https://ghcr.io\n"
        "storage:\n  path: /srv/cache\n"
        "cache:\n  tag_ttl: 2h\n",
    )
    config = load_config(path)
    assert (config.host, config.port) == ("127.0.0.1", 9000)
    assert config.upstream.url == "https://ghcr.io"
    assert config.storage.path == Path("/srv/cache")
    assert config.cache.tag_ttl == 7200
    assert config.redis.url is None  # not in the file: still the default
    assert Config().upstream.url == DEFAULT_UPSTREAM


async def test_flags_override_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listen: 127.0.0.1:9000\n"
        "upstream:\n  url: https://ghcr.io\n  username: u\n"
        "storage:\n  path: /srv/cache\n"
        "redis:\n  url: redis://file:6379\n",
    )
    config = apply_overrides(
        load_config(path),
        listen="[::1]:9100",
        upstream="http://127.0.0.1:5000/",
        storage="/tmp/other",
        redis="redis://flag:6379/1",
    )
    assert (config.host, config.port) == ("::1", 9100)
    assert config.upstream.url == "http://127.0.0.1:5000"
    assert config.upstream.username is None  # another registry: not the file's account
    assert config.storage.path == Path("/tmp/other")
    assert config.redis.url == "redis://flag:6379/1"


PRIVATE_UPSTREAM = (
    "upstream:\n  url: https://registry.internal.example\n  username: ci-bot\n"
    f"  password: {SECRET}\n  tls_verify: false\n  name: internal\n"
    "  deny: ['secret/**']\n  read_timeout: 9s\n  tag_ttl: 1m\n"
)


async def test_upstream_flag_for_another_registry_drops_the_files_account(
    tmp_path: Path,
) -> None:
    """The file's account, TLS settings, name and lists are for its own registry: a flag
    naming another gets an upstream of its own, and the password never goes there. How
    long to wait and to trust a tag stay."""
    config = apply_overrides(
        load_config(write(tmp_path, PRIVATE_UPSTREAM)), upstream="http://127.0.0.1:5000"
    )
    assert config.upstream == UpstreamConfig(
        url="http://127.0.0.1:5000", read_timeout=9, tag_ttl=60
    )
    assert config.policy is None  # the file's deny list went with its registry


async def test_upstream_flag_for_the_same_registry_keeps_its_entry(tmp_path: Path) -> None:
    file = load_config(write(tmp_path, PRIVATE_UPSTREAM))
    config = apply_overrides(file, upstream="https://REGISTRY.internal.example/")
    assert config.upstream.url == "https://REGISTRY.internal.example"
    assert (config.upstream.username, config.upstream.password) == ("ci-bot", SECRET)
    assert (config.upstream.name, config.upstream.tls_verify) == ("internal", False)
    assert config.policy == file.policy
    # The scheme counts: the password is not sent over plain HTTP to the same host.
    plain = apply_overrides(file, upstream="http://registry.internal.example")
    assert plain.upstream.password is None


async def test_upstream_flag_naming_another_upstream_is_refused_like_the_file() -> None:
    raw: dict[str, Any] = {"upstream": {}, "upstreams": {"ghcr.io": {"url": "https://ghcr.io"}}}
    with pytest.raises(ConfigError) as flag:
        apply_overrides(config_from_mapping(raw), upstream="https://ghcr.io")
    assert flag.value.key == "--upstream"
    assert "two upstreams are named 'ghcr.io'" in str(flag.value)
    assert "two upstreams" in str(config_error({**raw, "upstream": {"url": "https://ghcr.io"}}))


async def test_upstream_flag_leaving_a_rule_without_its_upstream_is_refused() -> None:
    raw = {
        "upstream": {"url": "https://registry.internal.example"},
        "auth": {"rules": [{"who": ["anonymous"], "pull": ["registry.internal.example/**"]}]},
    }
    config = config_from_mapping(raw)
    with pytest.raises(ConfigError) as flag:
        apply_overrides(config, upstream="https://quay.io")
    assert flag.value.key == "--upstream"
    assert "registry.internal.example/**" in str(flag.value)
    # Rules naming an upstream still there hold.
    kept = apply_overrides(config, upstream="https://registry.internal.example")
    assert kept.policy == config.policy


async def test_absent_flags_keep_file_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "listen: 127.0.0.1:9000\n"))
    assert apply_overrides(config) == config


@pytest.mark.parametrize(
    ("flag", "value"),
    [("listen", "nowhere"), ("upstream", "docker.io"), ("redis", "http://localhost:6379")],
)
async def test_bad_flag_named(flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), **{flag: value})
    assert info.value.key == f"--{flag}"
    assert repr(value) in str(info.value)


# --- the command line -----------------------------------------------------------------------


async def test_cli_bad_value_exits_2_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    storage = tmp_path / "store"
    path = write(
        tmp_path,
        f"listen: 127.0.0.1:{port}\nstorage:\n  path: {storage}\ncache:\n  tag_ttl: soon\n",
    )
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "cache.tag_ttl" in lines[0]
    assert "'soon'" in lines[0]
    assert result.stdout == ""
    assert not storage.exists()  # nothing started, nothing created


async def test_cli_config_not_utf8_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mirror.yml"
    path.write_bytes(b"log:\n  level: \xff\xfe\n")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"mirror: config: --config: {str(path)!r} is not UTF-8 text"
    ]


async def test_cli_unknown_key_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "cache:\n  tagttl: 10m\n")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["mirror: config: cache.tagttl: unknown key"]


async def test_cli_bad_flag_exits_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--listen", "nowhere", "--storage", str(tmp_path / "store"))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "--listen" in result.stderr and "'nowhere'" in result.stderr
    assert not (tmp_path / "store").exists()


async def test_cli_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(tmp_path / "absent.yml"))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "absent.yml" in result.stderr


async def test_cli_error_never_prints_password(tmp_path: Path) -> None:
    path = write(tmp_path, f"upstream:\n  username: u\n  password: {SECRET}\n  url: nope\n")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert "upstream.url" in result.stderr
    assert SECRET not in result.stderr + result.stdout


async def test_cli_honours_mirror_config_env(tmp_path: Path) -> None:
    path = write(tmp_path, "storage:\n  path: /x\n  size: 10G\n")
    result = run_cli("serve", env={"MIRROR_CONFIG": str(path)})
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["mirror: config: storage.size: unknown key"]


async def test_cli_config_flag_wins_over_env(tmp_path: Path) -> None:
    good_env = write(tmp_path, "cache:\n  tag_ttl: 10m\n", name="env.yml")
    bad_flag = write(tmp_path, "cache:\n  ttl: 10m\n", name="flag.yml")
    result = run_cli("serve", "--config", str(bad_flag), env={"MIRROR_CONFIG": str(good_env)})
    assert result.returncode == 2
    assert "cache.ttl" in result.stderr


async def test_log_format_json_or_text() -> None:
    assert config_from_mapping({"log": {"format": "json"}}).log.format == "json"
    err = config_error({"log": {"format": "xml"}})
    assert err.key == "log.format"


def test_shutdown_delay_is_a_duration_zero_by_default() -> None:
    assert Config().shutdown_delay == 0
    assert config_from_mapping({"shutdown_delay": "5s"}).shutdown_delay == 5
    assert config_error({"shutdown_delay": "soon"}).key == "shutdown_delay"
    assert config_error({"shutdown_delay": -1}).key == "shutdown_delay"


@pytest.mark.parametrize("value", ["", "  "])
async def test_empty_storage_flag_is_refused_like_the_file(value: str) -> None:
    with pytest.raises(ConfigError) as flag:
        apply_overrides(Config(), storage=value)
    assert flag.value.key == "--storage"
    assert config_error({"storage": {"path": value}}).key == "storage.path"
