"""Real processes for tests: redis-server, the distribution registry, the mirror, the fake hub
and a private dockerd, each on a free port on 127.0.0.1.

Every class has `start()`/`stop()` and is a context manager. A process runs in its own
session (so stop() can signal its whole process group) and writes its output to a log file
in the given work directory; start() fails with the log's tail when it does not come up.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
DOCKERD = "/usr/sbin/dockerd"
# /usr/local/bin/docker may be a different client; the Debian one matches dockerd 20.10.
DOCKER = "/usr/bin/docker"
# Everything here is on loopback: an http_proxy in the environment must not be used.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def missing_tools() -> list[str]:
    """The daemons and clients the e2e tests need that this machine lacks."""
    needed = [DOCKERD, DOCKER, "docker-registry", "redis-server"]
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if DOCKERD not in missing and os.geteuid() != 0:
        missing.append(f"root (for {DOCKERD})")
    return missing


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_for(what: str, check: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll `check()` until true; fail naming `what` (no timing is asserted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def http_status(
    url: str, timeout: float = 2.0, context: ssl.SSLContext | None = None
) -> int | None:
    """The status of a GET on url, or None when nothing answers; `context` for https."""
    opener = _OPENER
    if context is not None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        err.close()
        return int(err.code)
    except (OSError, http.client.HTTPException):
        return None


class ServiceError(RuntimeError):
    """A service did not start."""


class Service:
    """A subprocess with a log file, a readiness probe and a clean stop."""

    name = "service"
    stop_timeout = STOP_TIMEOUT
    ready_timeout = READY_TIMEOUT

    def __init__(self, workdir: Path | str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # --- to override -------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    def popen_kwargs(self) -> dict[str, Any]:
        return {}

    # --- lifecycle ---------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServiceError(f"{self.name} is not running")
        return self.proc.pid

    def start(self) -> Self:
        if self.proc is not None:
            raise ServiceError(f"{self.name} already started")
        self._log = self.log_path.open("ab")
        # A marker per start: a restarted service keeps appending to the same log.
        self._log.write(f"--- start: {' '.join(self.command())}\n".encode())
        self._log.flush()
        kwargs: dict[str, Any] = {"stdout": self._log, "stderr": subprocess.STDOUT}
        kwargs.update(self.popen_kwargs())
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, start_new_session=True, **kwargs
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._failure(f"exited with status {self.proc.returncode}")
            if self.is_ready():
                return
            time.sleep(0.1)
        raise self._failure(f"not ready after {self.ready_timeout:.0f}s")

    def _failure(self, what: str) -> ServiceError:
        cmd = " ".join(self.command())
        return ServiceError(
            f"{self.name} {what}\ncommand: {cmd}\nlog {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
            # Children that outlived the leader (same group) must not linger either.
            _signal_group(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class RedisServer(Service):
    """redis-server without persistence; keeps its port across stop()/start()."""

    name = "redis"

    def __init__(self, workdir: Path | str) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip

    def is_ready(self) -> bool:
        # A bare TCP accept can precede loading; PING proves it serves commands.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class DistributionRegistry(Service):
    """The CNCF distribution registry (docker-registry), optionally as a pull-through cache."""

    name = "registry"

    def __init__(
        self,
        workdir: Path | str,
        proxy_remoteurl: str | None = None,
        htpasswd: Path | None = None,
        realm: str = "basic-realm",
    ) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proxy_remoteurl = proxy_remoteurl
        # A bcrypt htpasswd file: clients must then send Basic credentials (set it between
        # a stop() and a start() to seed the registry without auth first).
        self.htpasswd = htpasswd
        self.realm = realm
        self.config_path = self.workdir / "registry.yml"
        self.storage_dir = self.workdir / "storage"
        # Served over HTTPS with this (cert, key) when set (between a stop() and a start(),
        # like htpasswd); tls_ca signed it; tls_client_ca: clients must present a certificate.
        self.tls: tuple[Path, Path] | None = None
        self.tls_ca: Path | None = None
        self.tls_client_ca: Path | None = None

    def config_text(self) -> str:
        # JSON is valid YAML; it spares quoting rules for paths and URLs.
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{self.port}"},
        }
        if self.proxy_remoteurl:
            config["proxy"] = {"remoteurl": self.proxy_remoteurl}
        if self.htpasswd is not None:
            config["auth"] = {"htpasswd": {"realm": self.realm, "path": str(self.htpasswd)}}
        if self.tls is not None:
            tls: dict[str, Any] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
            if self.tls_client_ca is not None:
                tls["clientcas"] = [str(self.tls_client_ca)]
            config["http"]["tls"] = tls
        return json.dumps(config, indent=2) + "\n"

    def start(self) -> Self:
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        self.config_path.write_text(self.config_text())
        return super().start()

    def command(self) -> list[str]:
        return ["docker-registry", "serve", str(self.config_path)]

    def is_ready(self) -> bool:
        # With htpasswd auth, an anonymous /v2/ is answered 401: that is up, too.
        wanted = (200, 401) if self.htpasswd is not None else (200,)
        if self.tls is not None and self.tls_client_ca is not None:
            return tcp_open(self.port)  # the probe has no client certificate
        context = None if self.tls is None else ssl.create_default_context(cafile=self.tls_ca)
        return http_status(f"{self.url}/v2/", context=context) in wanted


class MirrorProcess(Service):
    """`python -m mirror serve` from this repository."""

    name = "mirror"

    def __init__(
        self,
        workdir: Path | str,
        upstream: str,
        redis_url: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.upstream = upstream
        self.redis_url = redis_url
        self.extra_args = tuple(extra_args)
        # The tree whose `mirror` package runs: a previous release's, unpacked, in a rolling
        # update (set it between a stop() and a start()).
        self.code_root = REPO_ROOT

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "mirror", "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--upstream", self.upstream,
            "--storage", str(self.workdir / "data"),
        ]  # fmt: skip
        if self.redis_url:
            cmd += ["--redis", self.redis_url]
        return cmd + list(self.extra_args)

    def popen_kwargs(self) -> dict[str, Any]:
        return {"cwd": self.code_root, "env": _python_env(self.code_root)}

    def is_ready(self) -> bool:
        return http_status(f"{self.url}/healthz") == 200


def _python_env(root: Path = REPO_ROOT) -> dict[str, str]:
    """The environment for a Python child: `root` importable first, output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class FakeHubProcess(Service):
    """`python -m tests.fakehub`: a Docker-Hub-like front (token, registry, CDN) for a backend.

    It prints one JSON line `{"registry": url, "token": url, "cdn": url}` on stdout; stdout
    goes to its own file so that line can be read without a reader thread.
    """

    name = "fakehub"

    def __init__(self, backend_url: str, workdir: Path | str | None = None) -> None:
        # Without a workdir, a temp dir is made on start() and removed on stop().
        self._own_dir = workdir is None
        super().__init__(workdir or tempfile.gettempdir())
        self.backend_url = backend_url
        self.urls: dict[str, str] = {}
        self._stdout: IO[bytes] | None = None

    @property
    def registry_url(self) -> str:
        return self.urls["registry"]

    @property
    def stdout_path(self) -> Path:
        return self.workdir / "fakehub.stdout"

    def start(self) -> Self:
        if self._own_dir:
            self.workdir = Path(tempfile.mkdtemp(prefix="fakehub-"))
        return super().start()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.fakehub", "--backend", self.backend_url]

    def popen_kwargs(self) -> dict[str, Any]:
        self._stdout = self.stdout_path.open("wb")
        # stderr goes to the log; stdout is kept apart for the JSON line.
        return {"cwd": REPO_ROOT, "env": _python_env(), "stdout": self._stdout, "stderr": self._log}

    def is_ready(self) -> bool:
        if not self.urls:
            first = self.stdout_path.read_bytes().split(b"\n", 1)
            if len(first) < 2:
                return False  # the line is not complete yet
            try:
                self.urls = json.loads(first[0])
            except ValueError as err:
                raise self._failure(f"printed {first[0]!r}, not JSON") from err
        return http_status(f"{self.registry_url}/_stats") == 200

    def stats(self) -> dict[str, Any]:
        """The fake hub's request counters."""
        with _OPENER.open(f"{self.registry_url}/_stats", timeout=10) as resp:
            result: dict[str, Any] = json.load(resp)
        return result

    def reset(self) -> None:
        """Zero the fake hub's counters."""
        req = urllib.request.Request(f"{self.registry_url}/_reset", data=b"", method="POST")
        with _OPENER.open(req, timeout=10):
            pass

    def stop(self) -> None:
        super().stop()
        if self._stdout is not None:
            self._stdout.close()
            self._stdout = None
        self.urls = {}
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class DockerDaemon(Service):
    """A private dockerd (vfs, no bridge, no iptables) whose registry mirror is given.

    Its data root (workdir/root) is deleted on stop unless keep_data is set.

    Its sockets live in a short directory under /tmp: unix socket paths are limited to 108
    bytes and containerd puts its own sockets under the exec root.
    """

    name = "dockerd"
    stop_timeout = 30.0  # dockerd gives running containers 10 s to stop before it exits

    def __init__(
        self, workdir: Path | str, registry_mirror: str | None, keep_data: bool = False
    ) -> None:
        super().__init__(workdir)
        self.registry_mirror = registry_mirror
        self.keep_data = keep_data
        self.data_root = self.workdir / "root"
        self.run_dir: Path | None = None  # a short temp dir, made by start()
        # The client must not read the user's ~/.docker (credentials, contexts).
        self.client_config = self.workdir / "client"
        # Set: this directory is the daemon's /etc/docker (so its certs.d), see command().
        self.etc_docker: Path | None = None

    @property
    def socket(self) -> Path:
        if self.run_dir is None:
            raise ServiceError("dockerd is not started")
        return self.run_dir / "docker.sock"

    @property
    def host(self) -> str:
        """The daemon's address, for `docker -H` or DOCKER_HOST."""
        return f"unix://{self.socket}"

    def start(self) -> Self:
        self.run_dir = Path(tempfile.mkdtemp(prefix="dkr-", dir="/tmp"))
        return super().start()

    def command(self) -> list[str]:
        cmd = [
            DOCKERD,
            "--data-root", str(self.data_root),
            "--exec-root", str(self.socket.parent / "ex"),
            "--pidfile", str(self.socket.parent / "docker.pid"),
            "-H", self.host,
            # An empty config file keeps a host /etc/docker/daemon.json out of the tests.
            "--config-file", str(self._write_config()),
            "--storage-driver=vfs", "--iptables=false", "--ip-masq=false", "--bridge=none",
        ]  # fmt: skip
        if self.registry_mirror is not None:
            cmd += ["--registry-mirror", self.registry_mirror]
        if self.etc_docker is not None:
            # dockerd has no option for its certs.d: it reads /etc/docker/certs.d (rootless:
            # $XDG_CONFIG_HOME/docker/certs.d). A private mount namespace gives this daemon
            # its own /etc/docker and leaves the host's alone; exec keeps the pid.
            script = 'mount --bind "$0" /etc/docker && exec "$@"'
            cmd = ["unshare", "--mount", "--", "sh", "-c", script, str(self.etc_docker), *cmd]
        return cmd

    def _write_config(self) -> Path:
        path = self.workdir / "daemon.json"
        path.write_text("{}\n")
        return path

    def is_ready(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(self.socket))
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.0 200")
        except OSError:
            return False

    def docker(
        self, *args: str, check: bool = True, timeout: float = 300, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker client against this daemon; output is captured as text, `input`
        (a `--password-stdin`, say) is its stdin."""
        self.client_config.mkdir(exist_ok=True)
        env = dict(os.environ, DOCKER_CONFIG=str(self.client_config))
        env.pop("DOCKER_HOST", None)
        return subprocess.run(
            [DOCKER, "-H", self.host, *args], input=input,
            capture_output=True, text=True, check=check, timeout=timeout, env=env,
        )  # fmt: skip

    def stop(self) -> None:
        # dockerd's containerd and shims run in sessions of their own: find them by our
        # unique run directory in their command lines, after dockerd had its chance.
        super().stop()
        run_dir, self.run_dir = self.run_dir, None
        if run_dir is None:
            return  # never started
        _clean_up_run_dir(run_dir, self.data_root)
        if not self.keep_data:
            # vfs stores a full copy of every layer: hundreds of MB per test run otherwise.
            shutil.rmtree(self.data_root, ignore_errors=True)


class Containerd(Service):
    """A private containerd (CRI disabled) with its own root, state and socket.

    The socket and state live in a short directory under /tmp (unix socket paths are
    limited to 108 bytes); the content store and snapshots (workdir/root) are deleted on
    stop. `ctr()` runs the ctr client against it.
    """

    name = "containerd"

    def __init__(self, workdir: Path | str) -> None:
        super().__init__(workdir)
        self.root = self.workdir / "root"
        self.config_path = self.workdir / "config.toml"
        self.run_dir: Path | None = None  # a short temp dir, made by start()

    @property
    def socket(self) -> Path:
        if self.run_dir is None:
            raise ServiceError("containerd is not started")
        return self.run_dir / "containerd.sock"

    @property
    def state(self) -> Path:
        return self.socket.parent / "state"

    def config_text(self) -> str:
        # JSON strings are valid TOML basic strings.
        return "\n".join(
            [
                "version = 2",
                f"root = {json.dumps(str(self.root))}",
                f"state = {json.dumps(str(self.state))}",
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                "[grpc]",
                f"  address = {json.dumps(str(self.socket))}",
                # Not /opt/containerd: nothing of this daemon outside its own directories.
                '[plugins."io.containerd.internal.v1.opt"]',
                f"  path = {json.dumps(str(self.workdir / 'opt'))}",
                "",
            ]
        )

    def start(self) -> Self:
        self.run_dir = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
        self.config_path.write_text(self.config_text())
        return super().start()

    def command(self) -> list[str]:
        return [
            "containerd", "--config", str(self.config_path), "--root", str(self.root),
            "--state", str(self.state), "--address", str(self.socket),
        ]  # fmt: skip

    def is_ready(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return self.ctr("version", check=False, timeout=5).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run `ctr --address <socket> args...`; output is captured as text."""
        return subprocess.run(
            ["ctr", "--address", str(self.socket), *args],
            capture_output=True, text=True, check=check, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        super().stop()
        run_dir, self.run_dir = self.run_dir, None
        if run_dir is None:
            return  # never started
        _clean_up_run_dir(run_dir, self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def _clean_up_run_dir(run_dir: Path, data_root: Path) -> None:
    """After a daemon stopped: kill what it left running, unmount what it mounted, and
    remove its run directory."""
    _kill_strays(str(run_dir))
    _unmount_under(str(run_dir), str(data_root))
    shutil.rmtree(run_dir, ignore_errors=True)


def _kill_strays(marker: str) -> None:
    """SIGKILL processes whose command line mentions marker (a unique temp path)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def _unmount_under(*roots: str) -> None:
    """Lazily unmount whatever a killed daemon left mounted under roots (deepest first)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    points = [line.split()[1] for line in lines if len(line.split()) > 1]
    for point in sorted(points, key=len, reverse=True):
        if any(point == r or point.startswith(r + "/") for r in roots):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
