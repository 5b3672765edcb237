"""Helpers for the real-client tests (`test_clients.py`): credentials files, the mirror's
config file, containerd's hosts.toml files, and a transcript of every client command run.

The transcript keeps each command's output (never its arguments, which carry passwords,
nor its stdin) in a file, so that the closing grep for secrets covers what the clients
printed as well as the mirror's own logs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt

# Everything one of the mirror's bearer tokens (an HS256 JWT) could look like in a log.
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    """A bcrypt htpasswd file (cost 4: fast, and the format both readers need)."""
    lines = [
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for user, password in users.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def write_secret(path: Path, secret: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def write_mirror_config(path: Path, config: Mapping[str, Any]) -> Path:
    """The mirror's YAML config (written as JSON, which is YAML)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def write_hosts_dir(directory: Path, mirror_url: str, servers: Mapping[str, str]) -> Path:
    """`<dir>/<registry>/hosts.toml` for each registry: pull and resolve through the mirror,
    the registry's real server (unreachable here) as the fallback."""
    for registry, server in servers.items():
        (directory / registry).mkdir(parents=True, exist_ok=True)
        (directory / registry / "hosts.toml").write_text(
            f"server = {json.dumps(server)}\n\n"
            f"[host.{json.dumps(mirror_url)}]\n"
            '  capabilities = ["pull", "resolve"]\n'
        )
    return directory


def basic_token(user: str, password: str) -> str:
    """The base64 of `user:password`, as it would travel in an Authorization header."""
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Ran:
    """A client command's outcome."""

    shown: str  # the command as logged (no secrets)
    returncode: int
    output: str  # stdout then stderr
    seconds: float

    def ok(self) -> bool:
        return self.returncode == 0


class Transcript:
    """Runs client commands and appends what they print to `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.runs: list[Ran] = []

    def run(
        self,
        args: Sequence[str],
        *,
        shown: str,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        timeout: float = 300,
    ) -> Ran:
        started = time.monotonic()
        done = subprocess.run(
            list(args),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else {**os.environ, **env},
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        return self.record(shown, done, time.monotonic() - started)

    def record(
        self, shown: str, done: subprocess.CompletedProcess[str], seconds: float = 0.0
    ) -> Ran:
        ran = Ran(shown, done.returncode, done.stdout + done.stderr, seconds)
        self.runs.append(ran)
        with self.path.open("a") as log:
            log.write(f"$ {shown}  # exit {ran.returncode}, {seconds:.2f}s\n{ran.output}\n")
        print(f"\n$ {shown}  # exit {ran.returncode}, {seconds:.2f}s")
        return ran


def find_secrets(files: Iterable[Path], secrets: Mapping[str, str]) -> dict[str, list[str]]:
    """{file: [what was found]} for each named secret, and any JWT, found in the files."""
    found: dict[str, list[str]] = {}
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        hits = [name for name, secret in secrets.items() if secret and secret in text]
        hits += [f"a JWT: {match[:24]}..." for match in JWT.findall(text)]
        if hits:
            found[str(path)] = hits
    return found
