"""Redis in its replicated forms, as real processes on 127.0.0.1: Sentinel and Cluster.

- `RedisSentinelSetup`: a master, one replica in sync with it, and one sentinel watching
  them (quorum 1, down-after 2000 ms): SIGKILL of the master elects the replica in ~3 s.
- `RedisClusterSetup`: three masters holding all 16384 hash slots, no replicas.

Each is a context manager over `Service`s, so every process is stopped by its pid. Session
fixtures (`redis_sentinel`, `redis_cluster`) serve the tests that only read and write; a
test that breaks a topology (kills its master) builds its own under tmp_path.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from tests.services import RedisServer, Service, ServiceError, free_port, log_tail

MASTER_NAME = "mirror-master"
DOWN_AFTER_MS = 2000
SYNC_TIMEOUT = 30.0


def redis_command(port: int, *args: str, timeout: float = 2.0) -> str:
    """One command through redis-cli against 127.0.0.1:port; its raw output."""
    result = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "--raw", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.stdout


def info_field(port: int, section: str, field: str) -> str | None:
    """One `field:value` line of INFO (or CLUSTER INFO when section is "cluster-info")."""
    args = ["CLUSTER", "INFO"] if section == "cluster-info" else ["INFO", section]
    try:
        text = redis_command(port, *args)
    except subprocess.TimeoutExpired:
        return None
    for line in text.splitlines():
        name, _, value = line.strip().partition(":")
        if name == field:
            return value
    return None


def wait_until(what: str, check: object, timeout: float, logs: list[Path]) -> None:
    """Poll `check()` until it is true; fail with the logs' tails after `timeout`."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tails = "\n".join(f"log {path}:\n{log_tail(path)}" for path in logs)
    raise ServiceError(f"{what} not reached after {timeout:.0f}s\n{tails}")


class RedisNode(RedisServer):
    """redis-server with extra arguments (replication, cluster mode)."""

    def __init__(self, workdir: Path | str, extra: list[str] | None = None) -> None:
        super().__init__(workdir)
        self.extra = list(extra or [])

    def command(self) -> list[str]:
        return super().command() + self.extra


class SentinelProcess(Service):
    """redis-sentinel watching one master; ready once it names the master."""

    name = "sentinel"

    def __init__(self, workdir: Path | str, master_port: int) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.master_port = master_port
        # Sentinel rewrites its config file: it must be one of its own, writable.
        self.config_path = self.workdir / "sentinel.conf"
        self.config_path.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )

    def command(self) -> list[str]:
        return ["redis-sentinel", str(self.config_path)]

    def is_ready(self) -> bool:
        # Ready once it has seen the replica (a failover needs one to promote).
        try:
            out = redis_command(self.port, "SENTINEL", "REPLICAS", MASTER_NAME)
        except subprocess.TimeoutExpired:
            return False
        return "slave" in out and "ip" in out

    def master_port_now(self) -> int | None:
        """The port Sentinel names as the master at this moment."""
        try:
            out = redis_command(self.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        except subprocess.TimeoutExpired:
            return None
        lines = out.split()
        return int(lines[1]) if len(lines) == 2 else None


class RedisSentinelSetup:
    """A master, a replica in sync with it, and one sentinel, on loopback."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.master = RedisNode(workdir / "master", ["--repl-diskless-sync-delay", "0"])
        self.replica = RedisNode(
            workdir / "replica",
            ["--replicaof", "127.0.0.1", str(self.master.port), "--repl-diskless-sync-delay", "0"],
        )
        self.sentinel = SentinelProcess(workdir / "sentinel", self.master.port)
        self._stack = ExitStack()

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{MASTER_NAME}/0"

    def start(self) -> Self:
        with ExitStack() as stack:
            stack.enter_context(self.master)
            stack.enter_context(self.replica)
            # Sentinel finds replicas through the master's INFO, every 10 s after its first
            # look: with the replica in sync before it starts, it knows it at once.
            wait_until(
                "replica in sync",
                lambda: info_field(self.replica.port, "replication", "master_link_status") == "up",
                SYNC_TIMEOUT,
                [self.master.log_path, self.replica.log_path],
            )
            stack.enter_context(self.sentinel)
            self._stack = stack.pop_all()
        return self

    def master_port(self) -> int | None:
        return self.sentinel.master_port_now()

    def flush(self) -> None:
        port = self.master_port()
        assert port is not None, "Sentinel names no master"
        redis_command(port, "FLUSHALL")

    def stop(self) -> None:
        self._stack.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisClusterSetup:
    """Three cluster-mode redis-servers joined by `redis-cli --cluster create`."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = workdir
        self.nodes = [self._node(workdir / f"node{i}") for i in range(masters)]
        self._stack = ExitStack()

    @staticmethod
    def _node(workdir: Path) -> RedisNode:
        # The cluster bus port is a port of its own (not port + 10000, which may be taken).
        return RedisNode(
            workdir,
            [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(workdir / "nodes.conf"),
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", "2000",
            ],
        )  # fmt: skip

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{hosts}"

    def start(self) -> Self:
        """Start the nodes; the first time, join them into one cluster."""
        created = all((node.workdir / "nodes.conf").exists() for node in self.nodes)
        with ExitStack() as stack:
            for node in self.nodes:
                stack.enter_context(node)
            if not created:
                self._create()
            # A restarted node finds the others from its nodes.conf, by itself.
            wait_until(
                "cluster_state:ok on every node",
                lambda: all(
                    info_field(node.port, "cluster-info", "cluster_state") == "ok"
                    for node in self.nodes
                ),
                SYNC_TIMEOUT,
                [node.log_path for node in self.nodes],
            )
            self._stack = stack.pop_all()
        return self

    def _create(self) -> None:
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses,
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if create.returncode != 0:
            raise ServiceError(f"redis-cli --cluster create failed:\n{create.stdout}")

    def flush(self) -> None:
        for node in self.nodes:
            redis_command(node.port, "FLUSHALL")

    def keys_per_node(self) -> dict[int, list[str]]:
        """Every key, by the port of the master holding it."""
        return {node.port: redis_command(node.port, "KEYS", "*").split() for node in self.nodes}

    def stop(self) -> None:
        self._stack.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def require_redis_tools() -> None:
    missing = [t for t in ("redis-server", "redis-sentinel", "redis-cli") if not shutil.which(t)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (make test installs them)")


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelSetup]:
    """Master, replica and sentinel for the session; tests flush the master before use."""
    require_redis_tools()
    with RedisSentinelSetup(tmp_path_factory.mktemp("sentinel")) as setup:
        yield setup


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterSetup]:
    """A 3-master Redis Cluster for the session; tests flush it before use."""
    require_redis_tools()
    with RedisClusterSetup(tmp_path_factory.mktemp("cluster")) as setup:
        yield setup


TOPOLOGIES = ["single", "sentinel", "cluster"]


def flushed_redis_url(request: pytest.FixtureRequest, topology: str) -> str:
    """The URL of the session's Redis of that topology ("single", "sentinel", "cluster"),
    emptied first."""
    if topology == "single":
        server: RedisServer = request.getfixturevalue("redis_server")
        redis_command(server.port, "FLUSHALL")
        return server.url
    setup: RedisSentinelSetup | RedisClusterSetup = request.getfixturevalue(f"redis_{topology}")
    setup.flush()
    return setup.url
