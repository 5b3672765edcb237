"""The supervisor's rules, with stand-in workers (small Python scripts), and a worker's seat."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror import supervisor
from mirror.cache.downloads import FINISH_ON_CLOSE
from mirror.config import ConfigError
from mirror.config.load import config_from_mapping
from mirror.observe.logs import setup_logging
from mirror.supervisor import Supervisor, private_metrics_dir, remove_metrics_dir
from mirror.worker import (
    adopt_sockets,
    config_text_descriptor,
    seat_environment,
    seat_from_environment,
)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


CLEANUP_GRACE = supervisor.CLEANUP_GRACE  # as shipped: `fast` below shortens it


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "FIRST_DELAY", 0.01)
    monkeypatch.setattr(supervisor, "CLEANUP_GRACE", 0.0)


def script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def run(command: list[str], listener: socket.socket, tmp_path: Path, **kwargs: float) -> int:
    sup = Supervisor(command, [listener], 2, kwargs.get("shutdown_timeout", 5.0), tmp_path)
    return sup.run()


def terminate_when_ready(ready: Path, lines: int = 2) -> threading.Thread:
    """SIGTERM to this process (the supervisor under test) once `ready` has `lines` lines:
    one from each stand-in worker once its own SIGTERM handler is in place, or one per
    start when the test counts restarts."""

    def wait_then_stop() -> None:
        deadline = time.monotonic() + 60  # then signalled anyway: the test fails, not hangs
        while time.monotonic() < deadline:
            if ready.exists() and len(ready.read_text().splitlines()) >= lines:
                break
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=wait_then_stop)
    thread.start()
    return thread


# Writes a line per start (its worker index, and whether it replaced one) to a file.
RECORD = (
    "import os; open({path!r}, 'a').write(os.environ['MIRROR_WORKER'] + ' ' "
    "+ os.environ['MIRROR_WORKER_RESTART'] + ' ' + os.environ['PROMETHEUS_MULTIPROC_DIR'] "
    "+ chr(10));"
)


def test_workers_dying_at_once_are_restarted_with_backoff_then_given_up(
    listener: socket.socket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    starts = tmp_path / "starts"
    started = time.monotonic()
    status = run(
        script(RECORD.format(path=str(starts)) + "raise SystemExit(1)"), listener, tmp_path
    )
    assert status == 1
    lines = starts.read_text().splitlines()
    # One slot reached GIVE_UP deaths in a row; the other at most as many.
    assert supervisor.GIVE_UP <= len(lines) <= 2 * supervisor.GIVE_UP
    assert {line.split()[0] for line in lines} == {"1", "2"}
    assert all(line.split()[2] == str(tmp_path) for line in lines)
    assert [line.split()[1] for line in lines[:2]] == ["0", "0"]
    assert {line.split()[1] for line in lines[2:]} == {"1"}
    # Delays of 0.01, 0.02, 0.04, 0.08 s: doubling, yet no spinning.
    assert time.monotonic() - started >= 0.15
    assert "died at once 5 times in a row" in caplog.text


def test_a_worker_with_status_2_stops_the_others(listener: socket.socket, tmp_path: Path) -> None:
    code = (
        "import os, time\n"
        "if os.environ['MIRROR_WORKER'] == '2': raise SystemExit(2)\n"
        "time.sleep(60)"
    )
    started = time.monotonic()
    assert run(script(code), listener, tmp_path) == 2
    assert time.monotonic() - started < 10  # worker 1 got SIGTERM, not the full minute


def test_a_restarted_workers_status_2_is_a_death_like_any_other(
    listener: socket.socket, tmp_path: Path
) -> None:
    """Status 2 stops everything only from a worker's first start: a restarted one that
    exits 2 (a TLS pair replaced by a bad one since) is restarted with backoff."""
    starts = tmp_path / "starts"
    code = RECORD.format(path=str(starts)) + (
        "import os, time\n"
        "if os.environ['MIRROR_WORKER'] == '2':\n"
        "    raise SystemExit(2 if os.environ['MIRROR_WORKER_RESTART'] == '1' else 1)\n"
        "time.sleep(60)"
    )
    assert run(script(code), listener, tmp_path) == 1  # given up, after the backoff
    restarts = [line for line in starts.read_text().splitlines() if line.startswith("2 1")]
    assert len(restarts) == supervisor.GIVE_UP - 1


def test_workers_get_the_config_text_read_at_start(listener: socket.socket, tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    code = (
        "import os\n"
        "from mirror.worker import read_config_descriptor, seat_from_environment\n"
        "seat = seat_from_environment(os.environ)\n"
        f"open({str(seen)!r}, 'a').write(read_config_descriptor(seat.config) + chr(10))\n"
        "raise SystemExit(2)"
    )
    text = "workers: 2\nupstream: {url: 'https://r.example'}\n"
    fd = config_text_descriptor(text)
    try:
        sup = Supervisor(script(code), [listener], 2, 5.0, tmp_path, fd)
        assert sup.run() == 2
    finally:
        os.close(fd)
    assert seen.read_text().startswith(text + "\n")


def test_sigterm_drains_and_exits_zero(listener: socket.socket, tmp_path: Path) -> None:
    stopped, ready = tmp_path / "stopped", tmp_path / "ready"
    code = (
        "import signal, sys, time\n"
        f"def stop(*_): open({str(stopped)!r}, 'a').write('x'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"open({str(ready)!r}, 'a').write('ready' + chr(10))\n"
        "time.sleep(60)"
    )
    stopper = terminate_when_ready(ready)
    assert run(script(code), listener, tmp_path) == 0
    stopper.join()
    assert stopped.read_text() == "xx"


def test_a_worker_that_ignores_sigterm_is_killed_after_the_timeout(
    listener: socket.socket, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    code = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(ready)!r}, 'a').write('ready' + chr(10))\n"
        "time.sleep(60)"
    )
    # Signalled once both ignore it: before, SIGTERM killed a worker still starting, and
    # the test passed without a kill deadline.
    stopper = terminate_when_ready(ready)
    started = time.monotonic()
    assert run(script(code), listener, tmp_path, shutdown_timeout=0.5) == 0
    stopper.join()
    assert time.monotonic() - started < 30  # killed: left alone, each sleeps 60 s


def test_a_worker_that_lived_long_is_restarted_at_once(
    listener: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "QUICK_DEATH", 0.1)
    monkeypatch.setattr(supervisor, "FIRST_DELAY", 60.0)  # would stall the test if used
    starts = tmp_path / "starts"
    code = RECORD.format(path=str(starts)) + "import time; time.sleep(0.3); raise SystemExit(1)"
    # Stopped after 6 starts (the 60 s delay would have allowed 2), not at a fixed time: a
    # loaded machine can take longer than 2.5 s for 6 interpreters to start.
    stopper = terminate_when_ready(starts, lines=6)
    assert run(script(code), listener, tmp_path) == 0
    stopper.join()
    assert len(starts.read_text().splitlines()) >= 6


def test_the_workers_inherit_the_listening_socket(listener: socket.socket, tmp_path: Path) -> None:
    out = tmp_path / "accepted"
    code = (
        "import os, socket\n"
        "fd = int(os.environ['MIRROR_WORKER_SOCKETS'])\n"
        "conn, _ = socket.socket(fileno=fd).accept()\n"
        f"open({str(out)!r} + os.environ['MIRROR_WORKER'], 'w').write('ok')\n"
        "conn.close()\n"
        "import time; time.sleep(60)"
    )
    port = listener.getsockname()[1]

    def connect_twice() -> None:
        for _ in range(2):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        while len(list(tmp_path.glob("accepted*"))) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=connect_twice)
    thread.start()
    assert run(script(code), listener, tmp_path) == 0
    thread.join()
    assert sorted(p.name for p in tmp_path.glob("accepted*")) == ["accepted1", "accepted2"]


def test_a_seat_is_read_back_from_its_environment() -> None:
    env = seat_environment(3, [5, 6], 77, restarted=True)
    seat = seat_from_environment(env)
    assert seat is not None
    assert (seat.index, seat.sockets, seat.parent, seat.restarted) == (3, (5, 6), 77, True)
    assert seat_from_environment({}) is None


@pytest.mark.parametrize(
    "env",
    [{"MIRROR_WORKER": "1"}, {"MIRROR_WORKER": "x", "MIRROR_WORKER_SOCKETS": "3",
                               "MIRROR_WORKER_PARENT": "1"}],
)  # fmt: skip
def test_a_stray_worker_variable_is_a_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="MIRROR_WORKER"):
        seat_from_environment(env)


def test_a_descriptor_that_is_not_listening_is_refused() -> None:
    with socket.socket() as unbound:
        fd = os.dup(unbound.fileno())
        seat = seat_from_environment(seat_environment(1, [fd], os.getppid(), False))
        assert seat is not None
        with pytest.raises(ConfigError, match="not a listening socket"):
            adopt_sockets(seat, 1)  # and closed


def test_a_worker_names_itself_on_every_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for fmt, check in (("json", lambda line: json.loads(line)["worker"] == 2),
                           ("text", lambda line: " worker=2 [" in line)):  # fmt: skip
            setup_logging("INFO", fmt, worker=2)
            out = io.StringIO()
            monkeypatch.setattr(root.handlers[0], "stream", out)
            logging.getLogger("mirror.test").info("hello")
            assert check(out.getvalue().strip()), out.getvalue()
        setup_logging("INFO", "json")
        out = io.StringIO()
        monkeypatch.setattr(root.handlers[0], "stream", out)
        logging.getLogger("mirror.test").info("hello")
        assert "worker" not in json.loads(out.getvalue())
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_workers_with_a_cluster_are_refused_at_load(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 32 + "\n")
    cluster = {"advertise_url": "http://10.0.0.5:8083", "secret_file": str(secret)}
    with pytest.raises(ConfigError, match="workers: 2 with cluster"):
        config_from_mapping({"workers": 2, "cluster": cluster})
    assert config_from_mapping({"workers": 1}).workers == 1


def test_the_kill_deadline_leaves_a_worker_its_own_finishing_time() -> None:
    """A stopping worker lets verified downloads commit and upload for FINISH_ON_CLOSE
    after its requests' shutdown_timeout: killed within that, it left the blob to fetch
    again and a multipart upload open for an hour."""
    assert CLEANUP_GRACE >= FINISH_ON_CLOSE + 2


# As PID 1 of its own namespace: worker 1 leaves a grandchild behind (an orphan, which the
# kernel hands to PID 1) and dies; the stop comes once that orphan is gone from /proc and
# no zombie is left (reaped), or after a generous while, saying which.
AS_PID_1 = """
import os, pathlib, signal, socket, sys, threading, time
from mirror import supervisor
from mirror.supervisor import Supervisor
supervisor.FIRST_DELAY = 0.05
orphan = pathlib.Path(sys.argv[1]) / 'orphan'
worker = ("import os, subprocess, time\\n"
          "if os.environ['MIRROR_WORKER_RESTART'] == '1': time.sleep(60)\\n"
          "child = subprocess.Popen(['sleep', '0.1'])\\n"
          f"open({str(orphan)!r}, 'w').write(str(child.pid))\\n"
          "os._exit(0)")
def zombies():
    count = 0
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                stat = open(f'/proc/{entry}/stat').read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            count += stat[0] == 'Z'
    return count
def reaped():
    try:
        pid = int(orphan.read_text())
    except (OSError, ValueError):
        return False
    return not os.path.exists(f'/proc/{pid}') and zombies() == 0
def count_zombies():
    deadline = time.monotonic() + 20
    while not reaped() and time.monotonic() < deadline:
        time.sleep(0.05)
    if reaped():
        print('orphan reaped', flush=True)
    else:
        recorded = orphan.read_text() if orphan.exists() else None
        print('orphan', recorded, 'zombies', zombies(), flush=True)
    os.kill(1, signal.SIGTERM)
threading.Thread(target=count_zombies, daemon=True).start()
with socket.socket() as listener:
    listener.bind(('127.0.0.1', 0))
    listener.listen()
    command = [sys.executable, '-c', worker]
    Supervisor(command, [listener], 1, 1.0, pathlib.Path(sys.argv[1])).run()
"""


def test_as_pid_1_the_supervisor_reaps_the_orphans_it_inherits(tmp_path: Path) -> None:
    """In a container the supervisor is PID 1, the parent of every orphan: a worker that
    died with a child running left that child a zombie for good."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "--pid", "--fork", "true"], check=False)
    if unshare is None or probe.returncode != 0:
        pytest.skip("no PID namespace here (unshare needs root)")
    done = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", sys.executable, "-c", AS_PID_1,
         str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "orphan reaped" in done.stdout, done.stdout + done.stderr


def test_a_dead_workers_unreadable_metrics_file_does_not_stop_the_supervisor(
    listener: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folding a dead worker's counters (observe/workerfiles.py) reads its file: one the
    worker left torn must neither stop the supervisor nor stay to fail every scrape."""
    monkeypatch.setattr(supervisor, "QUICK_DEATH", 0.1)
    starts = tmp_path / "starts"
    torn = (
        "import os; d = os.environ['PROMETHEUS_MULTIPROC_DIR']; "
        "open(os.path.join(d, f'counter_{os.getpid()}.db'), 'wb')"
        ".write((1000).to_bytes(4, 'little') + bytes(12)); "
    )
    code = RECORD.format(path=str(starts)) + torn + "import time; time.sleep(0.3)"
    stopper = terminate_when_ready(starts, lines=6)
    assert run(script(code), listener, tmp_path) == 0
    stopper.join()
    assert len(starts.read_text().splitlines()) >= 6  # restarted again and again
    # The dead ones' dropped (left, each would fail every scrape); those of the two
    # stopped at the end stay, as a live worker's do.
    assert len(list(tmp_path.glob("counter_*.db"))) <= 2


_HOLD_METRICS_DIR = """
import sys, time
from mirror.supervisor import private_metrics_dir
print(private_metrics_dir(sys.argv[1]).path, flush=True)
time.sleep(120)
"""


def _supervisor_holding_a_metrics_dir(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_METRICS_DIR, str(tmp_path / "cache")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_metrics_directories_of_killed_supervisors_are_removed_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) leaves its workers' metric
    files: the next start removes them, and nothing of a supervisor still running, nor a
    directory it cannot tell is abandoned (no lock file, or made within the last minute:
    another supervisor may be making it) (before, each such kill left one for good)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed, killed_dir = _supervisor_holding_a_metrics_dir(tmp_path)
    alive, alive_dir = _supervisor_holding_a_metrics_dir(tmp_path)
    try:
        _stop(killed)
        young_dead, young_dir = _supervisor_holding_a_metrics_dir(tmp_path)
        _stop(young_dead)  # killed before it could matter: left, it may be one being made
        long_ago = time.time() - 3600
        os.utime(killed_dir, (long_ago, long_ago))
        unknown = tmp_path / "mirror-metrics-earlier"  # an earlier release's: no lock file
        unknown.mkdir()
        assert killed_dir.is_dir() and alive_dir.is_dir()
        mine = private_metrics_dir(tmp_path / "cache")
        try:
            assert not killed_dir.exists()
            assert alive_dir.is_dir() and unknown.is_dir() and mine.path.is_dir()
            assert young_dir.is_dir()
        finally:
            remove_metrics_dir(mine)
        assert not mine.path.exists()
    finally:
        _stop(alive)
        _stop(killed)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
