"""Where `mirror serve` listens: flag, then environment, then file; a taken port is one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import REPO_ROOT, free_port, http_status, wait_for


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **extra}


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            args, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


@pytest.fixture
def taken() -> Iterator[int]:
    """A port some other program is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_taken_port_is_one_line_naming_the_address_and_the_setting(
    tmp_path: Path, taken: int
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--listen", f"127.0.0.1:{taken}",
         "--storage", str(tmp_path / "data"), "--upstream", "http://127.0.0.1:9"],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"mirror: config: listen: cannot listen on 127.0.0.1:{taken}: address already in use;"
        " set listen to a free address"
    ]
    assert "serving on" not in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_the_file_sets_the_address_when_no_flag_or_variable_does(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nstorage:\n  path: {tmp_path / 'data'}\n"
        "upstream:\n  url: http://127.0.0.1:9\n"
    )
    _serve_and_check(tmp_path, [], _env(MIRROR_CONFIG=str(config)), port)


def test_the_variable_beats_the_file_and_the_flag_beats_both(tmp_path: Path) -> None:
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"listen: 127.0.0.1:{file_port}\nstorage:\n  path: {tmp_path / 'd'}\n")
    env = _env(MIRROR_CONFIG=str(config), MIRROR_LISTEN=f"127.0.0.1:{env_port}")
    _serve_and_check(tmp_path, [], env, env_port)
    _serve_and_check(tmp_path, ["--listen", f"127.0.0.1:{flag_port}"], env, flag_port)


def _serve_and_check(tmp_path: Path, flags: list[str], env: dict[str, str], port: int) -> None:
    log = tmp_path / f"mirror-{port}.log"
    proc = _start([sys.executable, "-m", "mirror", "serve", *flags], env, log)
    try:
        wait_for(
            f"the mirror on {port}", lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert f"http://127.0.0.1:{port}" in log.read_text()


def test_make_run_takes_port(tmp_path: Path) -> None:
    """`make run PORT=N` listens on N (with this interpreter's venv, so nothing is
    installed; the cache in tmp_path through MIRROR_STORAGE rather than ./mirror-data)."""
    port = free_port()
    venv = Path(sys.executable).parent.parent
    log = tmp_path / "make-run.log"
    env = _env(MIRROR_STORAGE=str(tmp_path / "data"))
    make = ["make", "-s", "-C", str(REPO_ROOT), "-o", f"{venv}/.installed", "run",
            f"PORT={port}", f"VENV={venv}"]  # fmt: skip
    proc = _start(make, env, log)
    try:
        wait_for("make run", lambda: http_status(f"http://127.0.0.1:{port}/healthz") == 200)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    assert f"http://0.0.0.0:{port}" in log.read_text()
