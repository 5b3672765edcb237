"""password_command: run with a bound, and never left running after it."""

from __future__ import annotations

import asyncio
import base64
import gc
from pathlib import Path

from mirror.oci.errors import Denied
from mirror.upstream.credentials import Credentials


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def gone(pid: int, seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if not running(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def read_pid(path: Path) -> int:
    for _ in range(250):
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        await asyncio.sleep(0.02)
    raise AssertionError(f"the command never wrote {path}")


async def settled() -> None:
    """Collect garbage now: a subprocess transport left open warns when collected, and the
    warning must fail this test rather than whichever test runs when it happens."""
    await asyncio.sleep(0.1)
    gc.collect()


def hanging_command(pid_file: Path) -> str:
    # The shell starts a child that would outlive a kill of the shell alone.
    return f"sleep 60 & echo $! > {pid_file}; wait"


async def test_hung_password_command_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    credentials = Credentials(
        "AWS", command=hanging_command(pid_file), upstream="ecr", command_timeout=0.5
    )

    assert "could not get its password" in await denial(credentials)
    assert await gone(await read_pid(pid_file)), "the command's child still runs"
    await settled()


async def test_password_command_of_a_cancelled_request_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    credentials = Credentials("AWS", command=hanging_command(pid_file), upstream="ecr")
    request = asyncio.create_task(credentials.header())
    pid = await read_pid(pid_file)

    request.cancel()
    await asyncio.wait({request})

    assert request.cancelled()
    del request  # its CancelledError holds the frames that held the process
    assert await gone(pid), "the command's child outlived the request"
    await settled()


async def denial(credentials: Credentials) -> str:
    """The message of the Denied that `header()` raises (kept in a frame of its own, so
    nothing holds on to the process once it returns)."""
    try:
        await credentials.header()
    except Denied as exc:
        return exc.message
    raise AssertionError("the password command did not fail")


async def test_password_command_within_its_bound_gives_the_password() -> None:
    credentials = Credentials("AWS", command="echo s3cret", command_timeout=5)

    expected = base64.b64encode(b"AWS:s3cret").decode()
    assert await credentials.header() == f"Basic {expected}"
