"""Upstream account credentials: a fixed password, or one a command prints (and re-prints).

ECR's password, for one, is a 12-hour token from `aws ecr get-login-password`: the command
is run on first use and again every `password_refresh`. Its output is never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from mirror.oci.errors import UpstreamDenied
from mirror.upstream.tokens import basic_authorization

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 60.0
# Without password_refresh, a command's password is still renewed this often.
DEFAULT_REFRESH = 6 * 3600.0


class Credentials:
    """The `Authorization: Basic` value for an upstream account."""

    def __init__(
        self,
        username: str,
        password: str | None = None,
        command: str | None = None,
        refresh: float | None = None,
        upstream: str = "",
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self._username = username
        self._password = password or ""
        self._command = command
        self._refresh = refresh or DEFAULT_REFRESH
        self._upstream = upstream
        self._command_timeout = command_timeout
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self.runs = 0

    async def header(self) -> str:
        if self._command is not None and self._is_due():
            async with self._lock:
                if self._is_due():
                    await self._run_command(self._command)
        return basic_authorization(self._username, self._password)

    def _is_due(self) -> bool:
        return self._fetched_at is None or time.monotonic() - self._fetched_at >= self._refresh

    async def _run_command(self, command: str) -> None:
        self.runs += 1
        try:
            # A session of its own, so that a hung command is killed with its children.
            proc = await asyncio.create_subprocess_shell(
                command,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            self._failed(f"could not run: {type(exc).__name__}")
            return
        try:
            async with asyncio.timeout(self._command_timeout):  # not wait_for: see eviction.py
                out, _ = await proc.communicate()
        except TimeoutError:
            self._failed(f"did not finish within {self._command_timeout:g}s")
            return
        finally:
            if proc.returncode is None:  # timed out or cancelled: it must not linger
                _kill_group(proc.pid)
                await proc.wait()  # reaped at once after SIGKILL; its pipes close with it
        password = out.decode(errors="replace").strip()
        if proc.returncode != 0 or not password:
            self._failed(f"exited with status {proc.returncode}")
            return
        self._password = password
        self._fetched_at = time.monotonic()

    def _failed(self, why: str) -> None:
        # Keep a password that worked before: better a soon-stale one than none.
        log.error("password_command for upstream %s %s", self._upstream, why)
        if self._fetched_at is None:
            raise UpstreamDenied(
                f"the mirror could not get its password for upstream {self._upstream}"
            )
        self._fetched_at = time.monotonic() - self._refresh + 60  # retry in a minute


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
