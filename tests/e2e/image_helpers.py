"""Helpers for the container image test (`test_image.py`): a Debian base image made offline
with debootstrap, an offline build context, and what Docker says about an image or container.

The base root filesystem takes a minute or more to make, so it is kept as a tarball in a
cache directory ($MIRROR_TEST_CACHE, else ~/.cache/mirror-tests), named by a hash of what
went into it: a change to the package list makes a new one.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from tests.services import DOCKER, REPO_ROOT, DockerDaemon, _unmount_under, log_tail

SUITE = "bookworm"  # its python3 is 3.11, the project's version
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# python3-venv: `python3 -m venv` with ensurepip, which the Dockerfile's build stage runs.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# What a slim image leaves out: package caches and lists, documentation, translations.
TRIMMED = (
    "var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
    "usr/share/info", "usr/share/locale",
)  # fmt: skip
DEBOOTSTRAP_TIMEOUT = 840
# The build context: what the Dockerfile's .dockerignore lets through (it filters this too).
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md")


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "mirror-tests"
    path = Path(os.environ.get("MIRROR_TEST_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _arch() -> str:
    done = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True)
    return done.stdout.strip() or "amd64"


def rootfs_tarball(cache: Path) -> Path:
    """A tarball of a minimal Debian root filesystem with python3; made once per cache."""
    recipe = json.dumps([SUITE, DEBIAN_MIRROR, _arch(), "minbase", BASE_PACKAGES, TRIMMED])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    tarball = cache / f"debian-{SUITE}-python3-{key}.tar"
    if not tarball.exists():
        _make_rootfs_tarball(cache, tarball)
    return tarball


def _make_rootfs_tarball(cache: Path, tarball: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=cache) as work:
        rootfs = Path(work) / "rootfs"
        started = time.monotonic()
        try:
            output = _debootstrap(rootfs, Path(work) / "debootstrap.log")
        finally:
            # debootstrap mounts /proc and /sys in the target while it installs; one that
            # failed or was killed may leave them, which the clean-up must not walk into.
            _unmount_under(str(rootfs))
        if output is not None:
            raise RuntimeError(f"debootstrap failed:\n{output}")
        print(f"\ndebootstrap {SUITE}: {time.monotonic() - started:.0f}s")
        for relative in TRIMMED:
            shutil.rmtree(rootfs / relative, ignore_errors=True)
        # Written under another name first: an interrupted run leaves no half tarball.
        partial = Path(work) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
        partial.rename(tarball)


def _debootstrap(rootfs: Path, log: Path) -> str | None:
    """Run debootstrap into rootfs; None when it succeeded, else its output's tail."""
    command = [
        "debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
        SUITE, str(rootfs), DEBIAN_MIRROR,
    ]  # fmt: skip
    with log.open("wb") as out:
        # Its own session: on a timeout, dpkg and its children go with it.
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            status = proc.wait(timeout=DEBOOTSTRAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = -1
    return None if status == 0 else log_tail(log)


def make_build_context(context: Path, target: dict[str, str]) -> Path:
    """A copy of the build's inputs plus wheels/: every wheel the runtime lock names (and
    setuptools, its build backend), so the image builds with no network. `target` is the
    base interpreter's marker environment (`marker_environment`): the lock must cover it."""
    context.mkdir(parents=True, exist_ok=True)
    for name in CONTEXT_FILES:
        shutil.copy2(REPO_ROOT / name, context / name)
    shutil.copytree(REPO_ROOT / "mirror", context / "mirror")
    shutil.copytree(REPO_ROOT / "requirements", context / "requirements")
    (context / "deploy").mkdir()
    shutil.copy2(REPO_ROOT / "deploy" / "config.example.yaml", context / "deploy")
    wheels = context / "wheels"
    download_locked(wheels, REPO_ROOT / "requirements" / "runtime.txt")
    missing = missing_requirements(wheels, target)
    if missing:
        raise RuntimeError(f"requirements/runtime.txt lacks {missing} for the image's python3")
    return context


def download_locked(wheels: Path, lock: Path) -> None:
    """Every pinned line of `lock`, whatever its marker says for this interpreter (the
    image's python3 may need what this one does not), with its hashes checked."""
    pinned = []
    for entry in re.split(r"\n(?=\S)", lock.read_text()):
        if not re.match(r"[A-Za-z0-9]", entry):
            continue  # comments
        first, _, hashes = entry.partition("\n")
        requirement = first.partition(" ;")[0].removesuffix(" \\")  # the marker goes
        pinned.append(f"{requirement} \\\n{hashes}")
    unmarked = wheels.parent / "unmarked-requirements.txt"
    unmarked.write_text("\n".join(pinned) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes",
         "--dest", str(wheels), "-r", str(unmarked)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    unmarked.unlink()
    if done.returncode != 0:
        raise RuntimeError(f"pip download of {lock.name} failed:\n{done.stderr[-3000:]}")


# The PEP 508 marker environment of the interpreter that runs it (what packaging's
# default_environment() computes), for a base image that has no packaging module.
MARKER_ENVIRONMENT = """
import json, os, platform, sys
i = sys.implementation.version
version = f"{i.major}.{i.minor}.{i.micro}"
if i.releaselevel != "final":
    version += i.releaselevel[0] + str(i.serial)
print(json.dumps({
    "implementation_name": sys.implementation.name, "implementation_version": version,
    "os_name": os.name, "platform_machine": platform.machine(),
    "platform_release": platform.release(), "platform_system": platform.system(),
    "platform_version": platform.version(), "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform,
}))
"""


def marker_environment(docker: DockerDaemon, image: str) -> dict[str, str]:
    """The marker environment of the image's python3, asked in a throwaway container."""
    done = docker.docker(
        "run", "--rm", "--network", "none", image, "python3", "-c", MARKER_ENVIRONMENT
    )
    env: dict[str, str] = json.loads(done.stdout)
    return env


def missing_requirements(wheels: Path, target: dict[str, str]) -> list[str]:
    """Requirements of the wheels in `wheels`, for `target`, that no wheel there meets: pip
    evaluates markers such as redis's `async-timeout; python_full_version < "3.11.3"` for the
    interpreter it runs on, and Debian's python3 is older than the host's here."""
    have = {}
    for wheel in wheels.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        have[name] = version
    missing = set()
    for wheel in wheels.glob("*.whl"):
        for requirement in _requires_dist(wheel):
            marker = requirement.marker
            if marker is not None and not marker.evaluate({**target, "extra": ""}):
                continue
            found = have.get(canonicalize_name(requirement.name))
            if found is None or not requirement.specifier.contains(found, prereleases=True):
                missing.add(f"{requirement.name}{requirement.specifier}")
    return sorted(missing)


def _requires_dist(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        # The wheel's own, at the top: setuptools carries vendored ones deeper down.
        (metadata,) = [
            n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1
        ]
        message = email.parser.BytesParser().parsebytes(archive.read(metadata))
    return [Requirement(line) for line in message.get_all("Requires-Dist") or []]


def docker_build(
    docker: DockerDaemon, context: Path, tag: str, build_args: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """`docker build` with no network at all, by BuildKit: the classic builder commits a
    container per instruction, each a full copy of the image on vfs (minutes here); BuildKit
    needs no image of its own as long as the Dockerfile names no `# syntax=` frontend."""
    env = dict(os.environ, DOCKER_BUILDKIT="1", DOCKER_CONFIG=str(docker.client_config))
    env.pop("DOCKER_HOST", None)
    args = [a for build_arg in build_args for a in ("--build-arg", build_arg)]
    command = [DOCKER, "-H", docker.host, "build", "--progress", "plain", "--network", "none"]
    return subprocess.run(
        [*command, "-t", tag, *args, str(context)],
        capture_output=True, text=True, timeout=280, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def inspect(docker: DockerDaemon, *args: str) -> Any:
    """`docker inspect` of one object, as JSON."""
    (found,) = json.loads(docker.docker("inspect", *args).stdout)
    return found


def image_size(docker: DockerDaemon, image: str) -> int:
    return int(inspect(docker, "--type", "image", image)["Size"])


def wait_healthy(docker: DockerDaemon, container: str, timeout: float = 90) -> dict[str, Any]:
    """The container's health record once it is no longer "starting"."""
    deadline = time.monotonic() + timeout
    while True:
        state = inspect(docker, "--type", "container", container)["State"]
        health: dict[str, Any] = state.get("Health") or {}
        if health.get("Status") != "starting" or not state["Running"]:
            return health
        if time.monotonic() > deadline:
            return health
        time.sleep(0.5)


def process_ids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of a host process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return int(fields["Uid"][0]), int(fields["Gid"][0])


def mib(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB"


# --- compose -----------------------------------------------------------------------------

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = "docker-compose"  # Debian's 1.29 (Python); `docker compose` v2 is not packaged


def host_network_compose(flags: Sequence[str]) -> dict[str, Any]:
    """deploy/compose.yaml's mirror service as it is, but for a daemon without a bridge:
    host networking in place of the published port and of the redis service (which would
    need an image from Docker Hub), and `flags` added to its command."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mirror = compose["services"]["mirror"]
    for key in ("ports", "depends_on"):
        mirror.pop(key, None)
    mirror["network_mode"] = "host"
    mirror["command"] = [*mirror["command"], *flags]
    # The same check, every second instead of every ten: no waiting in the test.
    mirror["healthcheck"]["interval"] = "1s"
    named = {entry.split(":")[0] for entry in mirror["volumes"] if not entry.startswith(".")}
    volumes = {name: compose["volumes"][name] for name in named}
    return {"services": {"mirror": mirror}, "volumes": volumes}


def docker_compose(
    docker: DockerDaemon, compose_file: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """docker-compose against this daemon, in deploy/ as its project directory: relative
    paths resolve as they do for users, and deploy/.env names the project."""
    env = dict(os.environ, DOCKER_HOST=docker.host, DOCKER_CONFIG=str(docker.client_config))
    return subprocess.run(
        [COMPOSE, "--project-directory", str(DEPLOY), "-f", str(compose_file), *args],
        capture_output=True, text=True, check=check, timeout=240, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
