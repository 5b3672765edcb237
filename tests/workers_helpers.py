"""Worker processes as their supervisor starts them, for tests that choose which one a
client reaches, or kill one: each `mirror serve` gets a listening socket of its own (a real
supervisor shares one), its seat in the environment, and `workers: 2` in its config (which
turns the sharing on: the file locks under tmp/, locks/ and eviction/, the SQLite metadata
file without Redis)."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from mirror.worker import seat_environment
from tests.fakehub import FakeHub
from tests.resilience_helpers import write_config
from tests.services import MirrorProcess

TAG_TTL = 1.0


class Worker(MirrorProcess):
    """One worker of a supervisor, on a listening socket of its own."""

    def __init__(self, workdir: Path, upstream: str, index: int, extra_args: list[str]) -> None:
        super().__init__(workdir, upstream, extra_args=extra_args)
        self.index = index
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(128)

    def command(self) -> list[str]:  # the supervisor passes no --listen: the socket is bound
        return [
            arg
            for arg in super().command()
            if arg != f"127.0.0.1:{self.port}" and arg != "--listen"
        ]

    def popen_kwargs(self) -> dict[str, Any]:
        kwargs = super().popen_kwargs()
        seat = seat_environment(self.index, [self.sock.fileno()], os.getpid(), False)
        kwargs["env"] = {**kwargs["env"], **seat}
        kwargs["pass_fds"] = (self.sock.fileno(),)
        return kwargs

    def stop(self) -> None:
        super().stop()
        self.sock.close()


async def start_workers(
    stack: ExitStack,
    tmp_path: Path,
    hub: FakeHub,
    redis_url: str | None = None,
    count: int = 2,
    **sections: Any,
) -> list[MirrorProcess]:
    """`count` mirror processes on one cache directory (`tmp_path/cache`), each in sharing
    mode; `sections` are more of their config."""
    config: dict[str, Any] = {"workers": 2, "cache": {"tag_ttl": f"{TAG_TTL}s"}, **sections}
    if redis_url is not None:
        config["redis"] = {"url": redis_url}
    processes = []
    for index in range(count):
        workdir = tmp_path / f"worker{index}"
        path = write_config(workdir / "mirror.yaml", config)
        args = ["--config", str(path), "--storage", str(tmp_path / "cache")]
        processes.append(Worker(workdir, hub.registry_url, index, args))
    # Started off the loop (the fake hub serves from this test's loop), side by side.
    return list(
        await asyncio.gather(*(asyncio.to_thread(stack.enter_context, p) for p in processes))
    )


async def eventually(
    what: str, check: Callable[[], object | Awaitable[object]], timeout: float = 60.0
) -> None:
    """Poll `check()` (awaited if it is a coroutine) until true; fail naming `what` after
    a generous while (no timing is asserted)."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
