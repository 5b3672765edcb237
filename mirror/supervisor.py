"""`workers: N`: a parent that binds the listeners once and keeps N worker processes on them.

Each worker is `python -m mirror serve` again (same arguments, a fresh interpreter) with the
listening sockets passed down as descriptors: every worker accepts from the same sockets, so
the port is never shared with a program that is not the mirror (as SO_REUSEPORT would allow),
and a restarted worker finds the connections queued while it was down. Spawning rather than
forking leaves each worker nothing of the parent's state (no event loop, no locks, no
metric values) and lets prometheus-client choose its multiprocess mode at import.

Every worker runs the config file as the parent read it at start (passed down as an
in-memory file): an edit since reaches no worker until mirror serve is restarted, rather
than the one worker that happened to restart.

The parent restarts a worker that dies (after a delay that doubles while it dies within
QUICK_DEATH of starting), stops everything and exits 2 when a worker could not start the
first time (its status 2: a bad config it printed; a restarted worker's status 2, from a
TLS file changed meanwhile, is a death like any other), exits 1 when one died at once
GIVE_UP times in a row, and on SIGTERM or SIGINT passes SIGTERM on, waits for the workers
to drain, and exits 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from mirror.observe.metrics import MULTIPROCESS_ENV
from mirror.observe.workerfiles import fold_dead
from mirror.util.filelock import try_lock
from mirror.worker import seat_environment

log = logging.getLogger(__name__)

QUICK_DEATH = 10.0  # seconds: a worker dying sooner is failing, not crashing now and then
FIRST_DELAY = 0.5  # seconds before restarting a worker that died at once; doubles each time
MAX_DELAY = 30.0
GIVE_UP = 5  # deaths at once in a row, after which restarting is pointless
# Past shutdown_timeout: a worker then lets verified downloads finish their commit and
# bucket upload (cache/downloads.py FINISH_ON_CLOSE, 10 s), and closes Redis, sessions and
# files. Killed sooner, it would leave a blob to fetch again and a multipart upload open.
CLEANUP_GRACE = 15.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_NUMBERS = frozenset(int(sig) for sig in STOP_SIGNALS)  # as the wake-up socket has them
EXIT_CONFIG = 2  # a worker's status for a config or start error it printed


@dataclass
class Slot:
    """One worker's place: its index, its process, and how its recent starts went."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None
    restarted: bool = False  # its process replaced one that died


class Supervisor:
    """Starts, restarts and stops the workers; owns the listening sockets."""

    def __init__(
        self,
        command: list[str],
        sockets: list[socket.socket],
        workers: int,
        shutdown_timeout: float,
        metrics_dir: Path,
        config_fd: int | None = None,
    ) -> None:
        self._command = command
        self._sockets = sockets
        self._config_fd = config_fd
        self._slots = [Slot(index) for index in range(1, workers + 1)]
        self._shutdown_timeout = shutdown_timeout
        self._metrics_dir = metrics_dir
        self._wakeup_read, self._wakeup_write = socket.socketpair()

    def run(self) -> int:
        """Serve until a stop signal or a failure; the exit status."""
        previous = self._catch_signals()
        try:
            for slot in self._slots:
                self._start(slot, restarted=False)
            status = self._watch()
            return self._drain(status)
        finally:
            self._release(previous)

    def _watch(self) -> int | None:
        """Restart workers until asked to stop (None) or until failing is all they do."""
        while True:
            if STOP_NUMBERS & self._wait(self._next_deadline()):
                log.info("stopping the workers")
                return None
            for slot in self._slots:
                status = self._reap(slot)
                if status is not None:
                    return status
                if slot.restart_at is not None and time.monotonic() >= slot.restart_at:
                    self._start(slot, restarted=True)
            self._reap_orphans()

    def _reap(self, slot: Slot) -> int | None:
        """Note a worker's death and plan its restart; an exit status to give up with."""
        if slot.process is None or (code := slot.process.poll()) is None:
            return None
        multiprocess.mark_process_dead(slot.process.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
        try:
            dropped = fold_dead(self._metrics_dir, slot.process.pid)
        except OSError as exc:  # its files stay, read as they are
            log.warning("worker %d's metrics not folded: %s", slot.index, exc)
        else:
            for name in dropped:
                log.warning("worker %d's metrics file %s was unreadable: dropped", slot.index, name)
        slot.process = None
        if code == EXIT_CONFIG and not slot.restarted:
            log.error("worker %d could not start (status 2): stopping", slot.index)
            return EXIT_CONFIG
        lived = time.monotonic() - slot.started
        slot.quick_deaths = slot.quick_deaths + 1 if lived < QUICK_DEATH else 0
        if slot.quick_deaths >= GIVE_UP:
            log.error("worker %d died at once %d times in a row: stopping", slot.index, GIVE_UP)
            return 1
        delay = FIRST_DELAY * 2 ** (slot.quick_deaths - 1) if slot.quick_deaths else 0.0
        delay = min(delay, MAX_DELAY)
        log.warning(
            "worker %d %s after %.1fs; restarting it in %.1fs",
            slot.index, describe_exit(code), lived, delay,
        )  # fmt: skip
        slot.restart_at = time.monotonic() + delay
        return None

    def _reap_orphans(self) -> None:
        """As PID 1 (a container's entrypoint), every orphan of the namespace becomes this
        process's child: a worker killed while a `password_command` shell ran leaves one.
        Reap those, never a worker (its Popen must see its status): peek first."""
        if os.getpid() != 1:
            return
        ours = {slot.process.pid for slot in self._slots if slot.process is not None}
        while True:
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if found is None or found.si_pid in ours:
                return  # none waiting, or a worker that died just now: its SIGCHLD is
                # already on the wake-up socket, and that wake-up comes back here
            with contextlib.suppress(ChildProcessError):
                os.waitpid(found.si_pid, 0)

    def _start(self, slot: Slot, restarted: bool) -> None:
        fds = [sock.fileno() for sock in self._sockets]
        seat = seat_environment(slot.index, fds, os.getpid(), restarted, self._config_fd)
        env = dict(os.environ, **seat)
        env[MULTIPROCESS_ENV] = str(self._metrics_dir)
        passed = fds if self._config_fd is None else [*fds, self._config_fd]
        slot.process = subprocess.Popen(self._command, pass_fds=passed, env=env)
        slot.started, slot.restart_at, slot.restarted = time.monotonic(), None, restarted

    def _drain(self, status: int | None) -> int:
        """SIGTERM to every worker; SIGKILL to those still there after the timeout."""
        for sock in self._sockets:  # no worker is started again: the last close resets
            sock.close()
        running = [slot.process for slot in self._slots if slot.process is not None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._shutdown_timeout + CLEANUP_GRACE
        # Further stop signals change nothing: `timeout`, init shims and process-group
        # kills often deliver the same one twice.
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            self._wait(deadline)
        for process in running:
            if process.poll() is None:
                log.warning("worker pid %d did not stop in time: killing it", process.pid)
                process.kill()
                process.wait()
        return 0 if status is None else status

    def _next_deadline(self) -> float | None:
        planned = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
        return min(planned) if planned else None

    def _wait(self, deadline: float | None) -> set[int]:
        """Sleep until a signal arrives or `deadline` passes; the signals that arrived."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([self._wakeup_read], [], [], timeout)
        return set(self._wakeup_read.recv(4096)) if ready else set()

    def _catch_signals(self) -> dict[int, object]:
        # Python runs handlers between bytecodes; the wake-up socket gets each signal's
        # number at once, so select() above returns for every stop and every child death.
        self._wakeup_write.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_write.fileno(), warn_on_full_buffer=False)
        previous: dict[int, object] = {}
        for sig in (*STOP_SIGNALS, signal.SIGCHLD):
            previous[sig] = signal.signal(sig, _noted)
        return previous

    def _release(self, previous: dict[int, object]) -> None:
        signal.set_wakeup_fd(-1)
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._wakeup_read.close()
        self._wakeup_write.close()


def _noted(signum: int, frame: FrameType | None) -> None:
    """The wake-up socket already has the signal; nothing else to do here."""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def worker_command(argv: list[str]) -> list[str]:
    """The command a worker runs: this interpreter, this package, the same arguments."""
    return [sys.executable, "-m", "mirror", *argv]


@dataclass(frozen=True)
class MetricsDir:
    """The workers' metric files' directory, and the lock its supervisor holds on it."""

    path: Path
    owner: int  # descriptor of `OWNER_LOCK`, flocked for the supervisor's life


# In each metrics directory: the file its supervisor holds an exclusive flock on. A directory
# whose lock anyone can take was left by a supervisor killed outright (SIGKILL, the OOM
# killer), whose `finally` never ran.
OWNER_LOCK = "owner.lock"
_PREFIXES = ("mirror-metrics-", ".metrics-")
# A metrics directory younger than this (seconds) is never taken for abandoned: between
# making it and locking its owner.lock, another supervisor starting could take the lock.
YOUNG = 60.0


def private_metrics_dir(fallback: str | Path) -> MetricsDir:
    """A fresh, private directory for the workers' metric files: under $TMPDIR, or under
    the cache directory when there is no writable temporary directory. What killed
    supervisors left there is removed first."""
    try:
        remove_abandoned(Path(tempfile.gettempdir()), _PREFIXES[0])
        path = Path(tempfile.mkdtemp(prefix=_PREFIXES[0]))
    except OSError:
        remove_abandoned(Path(fallback), _PREFIXES[1])
        path = Path(tempfile.mkdtemp(prefix=_PREFIXES[1], dir=fallback))
    owner = os.open(path / OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(owner, fcntl.LOCK_EX)
    return MetricsDir(path, owner)


def remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove the metrics directories under `parent` whose supervisor is gone (blocking).
    One with no lock file (an earlier release's, or one being made) is left alone."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            if entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink():
                _remove_if_abandoned(entry)


def _remove_if_abandoned(path: Path) -> None:
    try:
        if time.time() - path.stat().st_mtime < YOUNG:  # its supervisor may not hold it yet
            return
        fd = os.open(path / OWNER_LOCK, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        if try_lock(fd):
            shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)


def remove_metrics_dir(metrics: MetricsDir) -> None:
    shutil.rmtree(metrics.path, ignore_errors=True)
    os.close(metrics.owner)
