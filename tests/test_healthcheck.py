"""The image's HEALTHCHECK (`python -m mirror.healthcheck`): which address it asks, and its
answer against a real mirror process and against nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mirror.config import ConfigError
from mirror.healthcheck import check, health_url, https_only, listen_address, serve_arguments
from tests.certs import CA, TLSMirror
from tests.services import MirrorProcess, free_port


def test_serve_arguments_from_the_first_process() -> None:
    cmdline = b"/opt/mirror/bin/python3\0/opt/mirror/bin/mirror\0serve\0--listen\0:9000\0"
    assert serve_arguments(cmdline) == ["--listen", ":9000", ""]
    assert serve_arguments(b"/bin/sh\0-c\0sleep 1\0") == []


def test_listen_flag_wins_over_the_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("listen: 127.0.0.1:7000\n")
    args = ["--config", str(config), "--listen", "127.0.0.1:9000"]
    assert listen_address(args, {}) == ("127.0.0.1", 9000)
    assert listen_address(["--config", str(config)], {}) == ("127.0.0.1", 7000)


def test_config_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("listen: '[::]:7001'\nstorage: {path: /x}\n")
    assert listen_address([], {"MIRROR_CONFIG": str(config)}) == ("::", 7001)


def test_listen_from_the_environment_as_serve_takes_it(tmp_path: Path) -> None:
    """`mirror serve` takes $MIRROR_LISTEN over the file's `listen`, and --listen over both."""
    config = tmp_path / "config.yaml"
    config.write_text("listen: 127.0.0.1:7000\n")
    environ = {"MIRROR_CONFIG": str(config), "MIRROR_LISTEN": "127.0.0.1:7002"}
    assert listen_address([], environ) == ("127.0.0.1", 7002)
    assert listen_address(["--listen", "127.0.0.1:9000"], environ) == ("127.0.0.1", 9000)
    # A plain listener from the environment is the one asked, even beside tls.
    config.write_text("tls: {cert_file: a, key_file: b, listen: '127.0.0.1:8444'}\n")
    assert https_only([], environ) is None
    assert listen_address([], environ) == ("127.0.0.1", 7002)


def test_module_asks_where_the_environment_says(tmp_path: Path) -> None:
    """A mirror configured by MIRROR_LISTEN is healthy, though its file names another port."""
    config = tmp_path / "config.yaml"
    config.write_text(f"listen: 127.0.0.1:{free_port()}\n")  # nothing listens there
    with MirrorProcess(tmp_path / "mirror", "http://127.0.0.1:9") as mirror:
        environ = {"MIRROR_CONFIG": str(config), "MIRROR_LISTEN": f"127.0.0.1:{mirror.port}"}
        done = _run_module(environ)
    assert done.returncode == 0, done.stderr


def test_defaults_without_flags_or_config() -> None:
    assert listen_address([], {}) == ("0.0.0.0", 8083)


def test_unreadable_config_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        listen_address(["--config", str(tmp_path / "missing.yaml")], {})


def test_wildcard_addresses_are_asked_on_loopback() -> None:
    assert health_url("0.0.0.0", 8083) == "http://127.0.0.1:8083/healthz"
    assert health_url("::", 8083) == "http://[::1]:8083/healthz"
    assert health_url("10.0.0.5", 80) == "http://10.0.0.5:80/healthz"


def test_check_against_a_running_mirror(tmp_path: Path) -> None:
    with MirrorProcess(tmp_path / "mirror", "http://127.0.0.1:9") as mirror:
        assert check(f"{mirror.url}/healthz")
        assert not check(f"{mirror.url}/no-such-page")
    assert not check(f"http://127.0.0.1:{free_port()}/healthz", timeout=2)


def test_module_exit_status_without_a_mirror(tmp_path: Path) -> None:
    # Outside a container /proc/1 is init: the default address, where nothing listens here
    # unless a developer runs a mirror on 8083; the config names a free port instead.
    config = tmp_path / "config.yaml"
    config.write_text(f"listen: 127.0.0.1:{free_port()}\n")
    done = _run_module({"MIRROR_CONFIG": str(config)})
    assert done.returncode == 1
    assert "did not answer 200" in done.stderr


def _run_module(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m mirror.healthcheck` with `environ` (and a PATH) as its whole environment."""
    return subprocess.run(
        [sys.executable, "-m", "mirror.healthcheck"],
        env={**environ, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_https_only_config_is_asked_over_https(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("tls: {cert_file: a, key_file: b, listen: '127.0.0.1:8444'}\n")
    assert https_only(["--config", str(config)], {}) == ("127.0.0.1", 8444)
    # A plain listener, in the file or on the command line, is the one asked.
    assert https_only(["--config", str(config), "--listen", ":9000"], {}) is None
    config.write_text("listen: 127.0.0.1:7000\ntls: {cert_file: a, key_file: b}\n")
    assert https_only(["--config", str(config)], {}) is None
    config.write_text("tls: {cert_file: a, key_file: b}\n")
    assert https_only([], {"MIRROR_CONFIG": str(config)}) == ("0.0.0.0", 8443)


def test_null_listen_with_tls_is_https_only(tmp_path: Path) -> None:
    """`listen: null` with tls serves HTTPS alone, as an absent `listen` does."""
    config = tmp_path / "config.yaml"
    config.write_text("listen: null\ntls: {cert_file: a, key_file: b, listen: '127.0.0.1:8444'}\n")
    assert https_only(["--config", str(config)], {}) == ("127.0.0.1", 8444)
    config.write_text("listen: null\ntls: {cert_file: a, key_file: b, listen: null}\n")
    assert https_only(["--config", str(config)], {}) == ("0.0.0.0", 8443)
    assert listen_address(["--config", str(config)], {}) == ("0.0.0.0", 8083)  # no error


def test_module_asks_an_https_only_mirror_with_a_null_listen(tmp_path: Path) -> None:
    ca = CA(tmp_path / "ca")
    pair = ca.issue("mirror")
    tls = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
    with TLSMirror(tmp_path / "mirror", "http://127.0.0.1:9", ca.cert, tls) as mirror:
        # The running mirror's own tls section, with its plain listener set to null.
        config = tmp_path / "https-only.yaml"
        raw = yaml.safe_load(mirror.config_path.read_text())
        config.write_text(yaml.safe_dump({**raw, "listen": None}))
        done = _run_module({"MIRROR_CONFIG": str(config)})
    assert done.returncode == 0, done.stderr


def test_check_against_a_running_https_mirror(tmp_path: Path) -> None:
    ca = CA(tmp_path / "ca")
    pair = ca.issue("mirror")
    tls = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
    with TLSMirror(tmp_path / "mirror", "http://127.0.0.1:9", ca.cert, tls) as mirror:
        assert check(health_url("127.0.0.1", mirror.tls_port, "https"))
        assert not check(health_url("127.0.0.1", mirror.tls_port, "http"))
