"""A worker's side of `workers: N`: its index, the listening sockets it inherited, its parent.

The supervisor (mirror/supervisor.py) starts each worker as `python -m mirror serve` with the
same arguments and these environment variables; their absence means a single process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from mirror.config import ConfigError

log = logging.getLogger(__name__)

INDEX_ENV = "MIRROR_WORKER"  # 1..N: which worker this is, for logs
SOCKETS_ENV = "MIRROR_WORKER_SOCKETS"  # listening descriptors, one per listener, in order
PARENT_ENV = "MIRROR_WORKER_PARENT"  # the supervisor's pid: the worker stops when it dies
RESTART_ENV = "MIRROR_WORKER_RESTART"  # "1" when this process replaces one that died
# A descriptor holding the config file's text as the supervisor read it at start: every
# worker, a restarted one too, runs that config, not what the file says by then.
CONFIG_ENV = "MIRROR_WORKER_CONFIG"

PR_SET_PDEATHSIG = 1  # from linux/prctl.h


@dataclass(frozen=True)
class WorkerSeat:
    """What the supervisor told one worker."""

    index: int
    sockets: tuple[int, ...]
    parent: int
    restarted: bool
    config: int | None = None  # the descriptor of the config's text (CONFIG_ENV)


def seat_from_environment(env: Mapping[str, str]) -> WorkerSeat | None:
    """The seat a supervisor gave this process; None when it runs alone."""
    if INDEX_ENV not in env:
        return None
    try:
        index = int(env[INDEX_ENV])
        sockets = tuple(int(fd) for fd in env[SOCKETS_ENV].split(","))
        parent = int(env[PARENT_ENV])
        config = int(env[CONFIG_ENV]) if CONFIG_ENV in env else None
    except (KeyError, ValueError):
        raise ConfigError(INDEX_ENV, "is set only by mirror serve for its workers") from None
    return WorkerSeat(index, sockets, parent, env.get(RESTART_ENV) == "1", config)


def seat_environment(
    index: int, sockets: list[int], parent: int, restarted: bool, config: int | None = None
) -> dict[str, str]:
    """The variables that make `mirror serve` a worker: the inverse of the above."""
    env = {
        INDEX_ENV: str(index),
        SOCKETS_ENV: ",".join(str(fd) for fd in sockets),
        PARENT_ENV: str(parent),
        RESTART_ENV: "1" if restarted else "0",
    }
    if config is not None:
        env[CONFIG_ENV] = str(config)
    return env


def config_text_descriptor(text: str) -> int:
    """An anonymous in-memory file holding `text`, for the workers to inherit (Linux): the
    config may hold secrets, so it never goes to disk."""
    fd = os.memfd_create("mirror-config", os.MFD_CLOEXEC)
    data = text.encode()
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], written)
    return fd


def read_config_descriptor(fd: int) -> str:
    """The config text the supervisor passed down (blocking, at start)."""
    try:
        size = os.fstat(fd).st_size
        data = b""
        while len(data) < size and (piece := os.pread(fd, size - len(data), len(data))):
            data += piece
    except OSError as exc:
        raise ConfigError(CONFIG_ENV, f"descriptor {fd}: {exc.strerror}") from None
    return data.decode()


def adopt_sockets(seat: WorkerSeat, wanted: int) -> list[socket.socket]:
    """The inherited listening sockets, checked: each must be a listening TCP socket."""
    if len(seat.sockets) != wanted:  # the config file changed since the supervisor read it
        raise ConfigError(
            "--config", "the listeners changed since mirror serve started: restart it"
        )
    return [_adopt(fd) for fd in seat.sockets]


def _adopt(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(SOCKETS_ENV, f"descriptor {fd}: {exc.strerror}") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.close()
        raise ConfigError(SOCKETS_ENV, f"descriptor {fd} is not a listening socket")
    sock.setblocking(False)
    return sock


def stop_with_parent(seat: WorkerSeat) -> None:
    """Ask the kernel for SIGTERM (a graceful stop) when the supervisor dies, so that no
    worker serves on unsupervised; Linux only, elsewhere a warning."""
    libc_name = ctypes.util.find_library("c")
    prctl = getattr(ctypes.CDLL(libc_name, use_errno=True), "prctl", None) if libc_name else None
    if prctl is None or prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to stop with the supervisor: this worker may outlive it")
        return
    if os.getppid() != seat.parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
