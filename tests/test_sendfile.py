"""Bodies sent by sendfile on both event loops (mirror/net/sendfile.py), over real sockets.

    raw socket client ──> python -m tests.sendfile_server --loop asyncio|uvloop (send_file)
    raw socket client ──> python -m mirror serve (a cached blob) ──> docker-registry

Whole files and ranges byte for byte, a slow reader, clients that leave mid-body, the next
request on the same connection, TLS (copied), and the CPU a sendfile saves over a copy:
uvloop has no `loop.sendfile`, so without mirror/net/sendfile.py it copies every byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from mirror.web.sendfile import COPY_PIECE
from tests.certs import CA, client_context
from tests.images import DOCKER_LAYER, Blob, push_blob
from tests.procmem import cpu_seconds, open_fds, runs_uvloop
from tests.sendfile_server import SLICE
from tests.services import (
    REPO_ROOT,
    DistributionRegistry,
    MirrorProcess,
    Service,
    free_port,
    tcp_open,
    wait_for,
)

MIB = 1024 * 1024
BIG = 256 * MIB
PAD = 256 * 1024  # a response head this big
HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
LOOPS = [
    "asyncio",
    pytest.param("uvloop", marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="no uvloop")),
]


@dataclass(frozen=True)
class BigFile:
    path: Path
    sha256: str

    def span(self, start: int, length: int) -> bytes:
        with self.path.open("rb") as file:
            return os.pread(file.fileno(), length, start)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> BigFile:
    """256 MiB: a random MiB repeated, each copy starting with its own index."""
    path = tmp_path_factory.mktemp("sendfile") / "big"
    block, digest = os.urandom(MIB), hashlib.sha256()
    with path.open("wb") as file:
        for index in range(BIG // MIB):
            chunk = index.to_bytes(8, "big") + block[8:]
            file.write(chunk)
            digest.update(chunk)
    return BigFile(path, digest.hexdigest())


class SendfileServer(Service):
    """tests/sendfile_server.py on one event loop; HTTPS when given a pair."""

    name = "sendfile"

    def __init__(
        self,
        workdir: Path,
        loop: str,
        file: Path,
        pair: tuple[Path, Path] | None = None,
        sndbuf: int = 0,
    ) -> None:
        super().__init__(workdir)
        self.loop, self.file, self.pair, self.sndbuf = loop, file, pair, sndbuf
        self.port = free_port()
        self.baseline_fds = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "tests.sendfile_server", "--loop", self.loop,
               "--file", str(self.file), "--port", str(self.port)]  # fmt: skip
        if self.pair is not None:
            cmd += ["--cert", str(self.pair[0]), "--key", str(self.pair[1])]
        return cmd + ["--sndbuf", str(self.sndbuf)]

    def popen_kwargs(self) -> dict[str, Any]:
        return {"cwd": REPO_ROOT}

    def is_ready(self) -> bool:
        return tcp_open(self.port)

    def start(self) -> Self:
        super().start()
        try:
            wait_for("the probe's connection closed", lambda: not connections(self.pid, self.port))
        except BaseException:
            self.stop()
            raise
        self.baseline_fds = open_fds(self.pid)  # with no client connected
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def connections(pid: int, port: int) -> int:
    """The TCP connections (not the listener) `pid` holds on its local `port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            inodes.add(os.readlink(fd))
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, state, inode = int(fields[1].split(":")[1], 16), fields[3], fields[9]
        listening = state == "0A"
        count += local_port == port and not listening and f"socket:[{inode}]" in inodes
    return count


@pytest.fixture(scope="module", params=LOOPS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, big_file: BigFile
) -> Iterator[SendfileServer]:
    workdir = tmp_path_factory.mktemp(f"server-{request.param}")
    with SendfileServer(workdir, request.param, big_file.path) as running:
        assert runs_uvloop(running.pid) == (request.param == "uvloop")
        yield running


class PacedReader(io.RawIOBase):
    """A socket's bytes, with a stop of `pause` seconds after every `every` bytes."""

    def __init__(self, sock: socket.socket, every: int, pause: float) -> None:
        self.sock, self.every, self.pause, self.since = sock, every, pause, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.every and self.since >= self.every:
            time.sleep(self.pause)
            self.since = 0
        want = len(buffer) if not self.every else min(len(buffer), self.every - self.since)
        got = self.sock.recv_into(buffer, want)
        self.since += got
        return got


class Conn:
    """One kept-alive HTTP/1.1 connection, read as fast or as slowly as the test says."""

    def __init__(
        self,
        port: int,
        context: ssl.SSLContext | None = None,
        rcvbuf: int | None = None,
        pace: tuple[int, float] = (0, 0.0),
    ) -> None:
        """`pace`: (bytes, seconds) to stop for after every so many bytes read."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connecting: it sets the window offered
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(60)
        sock.connect(("127.0.0.1", port))
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.file = io.BufferedReader(PacedReader(sock, *pace), 64 * 1024)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
        """Send a GET; its status and headers (names lowercased)."""
        lines = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{lines}\r\n".encode())
        return self.read_head()

    def read_head(self) -> tuple[int, dict[str, str]]:
        """The next response's status and headers (names lowercased)."""
        status = int(self.file.readline().split()[1])
        fields = {}
        while (line := self.file.readline().decode("latin-1").strip()) != "":
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return status, fields

    def read(self, length: int) -> bytes:
        data = self.file.read(length)
        assert len(data) == length, f"{len(data)} of {length} bytes, then the connection closed"
        return data

    def digest(self, length: int) -> str:
        """The sha256 of the next `length` bytes."""
        digest, left = hashlib.sha256(), length
        while left:
            chunk = self.file.read1(min(left, 64 * 1024))
            assert chunk, f"the connection closed {left} bytes short"
            digest.update(chunk)
            left -= len(chunk)
        return digest.hexdigest()

    def discard(self, length: int) -> None:
        """Read the next `length` bytes as fast as possible, 1 MiB at a time."""
        buffer = memoryview(bytearray(MIB))
        while length:
            got = self.file.readinto(buffer[: min(length, MIB)])
            assert got, f"the connection closed {length} bytes short"
            length -= got

    def discard_chunked(self) -> int:
        """Read a chunked body to its end; its length."""
        total = 0
        while size := self.chunk_size():
            self.discard(size + 2)  # and its CRLF
            total += size
        self.read(2)
        return total

    def read_chunked(self) -> bytes:
        """A chunked body, read to its end."""
        body = bytearray()
        while size := self.chunk_size():
            body += self.read(size)
            self.read(2)
        self.read(2)
        return bytes(body)

    def chunk_size(self) -> int:
        return int(self.file.readline().split(b";")[0], 16)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def small_after(conn: Conn) -> None:
    """A request on the same connection after a body: the transport is intact."""
    status, headers = conn.get("/small")
    assert status == 200 and conn.read(int(headers["content-length"])) == b"small\n"


# --- the file server, on both loops -----------------------------------------------------------


def test_whole_file_and_ranges_byte_exact_then_the_next_request(
    server: SendfileServer, big_file: BigFile
) -> None:
    """Every body on one kept-alive connection, sent in odd-sized slices."""
    with Conn(server.port) as conn:
        status, headers = conn.get("/file")
        assert status == 200 and int(headers["content-length"]) == BIG
        assert conn.digest(BIG) == big_file.sha256
        spans = [(0, 0), (5, 2 * SLICE + 3), (SLICE - 1, SLICE), (BIG - 1, None),
                 (BIG - 10 * MIB - 3, None)]  # fmt: skip
        for first, last in spans:
            end = BIG if last is None else last + 1
            wanted = f"bytes={first}-{'' if last is None else last}"
            status, headers = conn.get("/file", {"Range": wanted})
            assert status == 206 and int(headers["content-length"]) == end - first
            assert conn.read(end - first) == big_file.span(first, end - first), wanted
        small_after(conn)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_head_still_in_the_transport_goes_first(
    loop: str, tmp_path: Path, big_file: BigFile
) -> None:
    """Through a small send buffer, heads larger than it takes at once (so the transport
    holds the rest when sendfile starts), after copied bodies, requests pipelined and read
    slowly: every byte in its place."""
    first, second = (7, 8 * MIB), (3 * MIB, 13 * MIB + 1)
    requests = [("/copy", first), ("/file", second), ("/copy", second), ("/file", first)]
    with (
        SendfileServer(tmp_path, loop, big_file.path, sndbuf=16 * 1024) as running,
        Conn(running.port, rcvbuf=64 * 1024, pace=(256 * 1024, 0.01)) as conn,
    ):
        conn.sock.sendall(b"".join(
            f"GET {path}?pad={PAD} HTTP/1.1\r\nHost: t\r\nRange: bytes={a}-{b}\r\n\r\n".encode()
            for path, (a, b) in requests
        ))  # fmt: skip
        for path, (a, b) in requests:
            status, headers = conn.read_head()
            body = conn.read_chunked() if path == "/copy" else conn.read(b + 1 - a)
            assert status == 206 and body == big_file.span(a, b + 1 - a), path
            assert len(headers["x-pad"]) == PAD
        small_after(conn)


def test_a_slow_reader_gets_every_byte_and_the_server_waits_without_spinning(
    server: SendfileServer, big_file: BigFile
) -> None:
    rcvbuf = 64 * 1024
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    # The body is many times what both socket buffers hold: the server's sends find the
    # socket full (EAGAIN) and wait for it, again and again.
    assert BIG > 16 * (wmem_max + 2 * rcvbuf), "the socket buffers hold the body: no wait"
    with Conn(server.port, rcvbuf=rcvbuf, pace=(8 * MIB, 0.05)) as conn:
        cpu, started = cpu_seconds(server.pid), time.monotonic()
        status, _ = conn.get("/file")
        assert status == 200
        assert conn.digest(BIG) == big_file.sha256
        cpu, wall = cpu_seconds(server.pid) - cpu, time.monotonic() - started
        small_after(conn)
    # A server polling a full socket would burn the reader's pauses away.
    assert cpu < wall / 2, f"the server used {cpu:.2f} CPU-s over {wall:.2f} s"


def test_clients_leaving_mid_body_leave_nothing_open(
    server: SendfileServer, big_file: BigFile
) -> None:
    """Clients that close after some bytes, or after none while the server waits for them
    (a reset either way: they leave bytes unread): each is logged once, quietly; every
    descriptor goes; the server serves on."""
    before = server.log()
    conns = []
    for read in (1 * MIB, 0, 5 * MIB, 0, 17, 3 * SLICE, 2 * MIB, 0):
        conn = Conn(server.port)
        assert conn.get("/file")[0] == 200
        conn.read(read)
        conns.append(conn)
    time.sleep(1.5)  # the server's sends are blocked on full sockets now
    for conn in conns:
        conn.close()
    wait_for("every descriptor closed", lambda: open_fds(server.pid) == server.baseline_fds)
    log = server.log()[len(before) :]
    assert log.count("cut short") == len(conns), log
    assert "Traceback" not in log and "Error handling request" not in log, log
    with Conn(server.port) as conn:
        status, headers = conn.get("/file", {"Range": "bytes=100-"})
        assert status == 206
        assert conn.digest(BIG - 100) == hashlib.sha256(big_file.span(100, BIG - 100)).hexdigest()


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (make system-deps)")
def test_a_sized_body_goes_by_sendfile_and_a_chunked_one_is_copied(
    server: SendfileServer, big_file: BigFile, tmp_path: Path
) -> None:
    """The server's system calls, counted by strace on all its threads while each body
    goes out: the sized one by sendfile with no read of the file into the process, the
    chunked one read into it (send_file's copy path: preadv2 on the loop, the file being
    in the page cache, else pread in a thread). Counted, not timed: the CPU-seconds saved
    depend on the machine (make bench shows them)."""
    with Conn(server.port) as conn:
        with traced(server.pid, tmp_path / "file.strace") as calls:
            status, headers = conn.get("/file")
            assert status == 200
            conn.discard(int(headers["content-length"]))
        assert calls["sendfile"] > 0 and calls["reads"] == 0, calls
        with traced(server.pid, tmp_path / "copy.strace") as calls:
            status, _ = conn.get("/copy")
            assert status == 200
            assert conn.discard_chunked() == BIG
        assert calls["reads"] >= BIG // COPY_PIECE and calls["sendfile"] == 0, calls


@contextlib.contextmanager
def traced(pid: int, out: Path) -> Iterator[dict[str, int]]:
    """Counts of sendfile calls and of reads (pread64, preadv2) by `pid`'s threads while
    the block runs."""
    calls: dict[str, int] = {}
    cmd = ["strace", "-f", "-c", "-e", "trace=sendfile,pread64,preadv2", "-o", str(out)]
    said = out.with_suffix(".log")
    with said.open("w") as stderr:
        tracer = subprocess.Popen([*cmd, "-p", str(pid)], stderr=stderr)

    def attached() -> bool:
        """strace says "Process N attached [with K threads]" once it holds every thread
        (and -f follows those started later): only then may the request go."""
        return " attached" in said.read_text() or tracer.poll() is not None

    try:
        wait_for("strace to attach", attached, 60)
        assert " attached" in said.read_text(), said.read_text()
        yield calls
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
    calls.update(sendfile=0, reads=0)
    for line in out.read_text().splitlines():
        fields = line.split()
        if fields and fields[-1] in ("sendfile", "pread64", "preadv2"):
            calls["sendfile" if fields[-1] == "sendfile" else "reads"] += int(fields[3])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
@pytest.mark.parametrize("loop", LOOPS)
def test_over_tls_the_body_is_copied_through_the_encryption(
    loop: str, tmp_path: Path, big_file: BigFile
) -> None:
    """A raw sendfile to a TLS connection's socket would break its records: every byte
    arriving decrypted and in place shows the copy path was taken."""
    ca = CA(tmp_path / "ca")
    pair = ca.issue("server")
    with (
        SendfileServer(tmp_path, loop, big_file.path, (pair.cert, pair.key)) as running,
        Conn(running.port, client_context(ca.cert)) as conn,
    ):
        status, _ = conn.get("/file")
        assert status == 200 and conn.digest(BIG) == big_file.sha256
        status, headers = conn.get("/file", {"Range": f"bytes={SLICE - 5}-{3 * SLICE}"})
        length = 2 * SLICE + 6
        assert status == 206 and conn.read(length) == big_file.span(SLICE - 5, length)
        small_after(conn)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
@pytest.mark.parametrize("loop", LOOPS)
def test_over_tls_a_file_partly_out_of_the_page_cache_is_copied_whole(
    loop: str, tmp_path: Path, big_file: BigFile
) -> None:
    """The copy reads on the event loop what the page cache holds and the rest in a thread
    (mirror/web/sendfile.py `_read`): with every other stretch of the file evicted, each
    piece read partly, wholly or not at all from the cache, every byte comes in place."""
    with big_file.path.open("rb") as file:
        fd = file.fileno()
        os.fsync(fd)  # dirty pages are not evicted
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: these pages only
        for start in range(0, BIG, 3 * MIB):
            os.pread(fd, MIB + 12345, start + 777)
        try:
            os.preadv(fd, [bytearray(4096)], 2 * MIB + 65536, os.RWF_NOWAIT)
            pytest.skip("the file's pages stayed in the page cache")
        except BlockingIOError:
            pass
    ca = CA(tmp_path / "ca")
    pair = ca.issue("server")
    with (
        SendfileServer(tmp_path, loop, big_file.path, (pair.cert, pair.key)) as running,
        Conn(running.port, client_context(ca.cert)) as conn,
    ):
        status, _ = conn.get("/file")
        assert status == 200 and conn.digest(BIG) == big_file.sha256


# --- the mirror ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Blob]]:
    if shutil.which("docker-registry") is None:
        pytest.skip("needs docker-registry")
    blob = Blob.of(DOCKER_LAYER, os.urandom(24 * MIB + 5))
    with DistributionRegistry(tmp_path_factory.mktemp("registry")) as reg:
        push_blob(reg.url, "library/big", blob)
        yield reg.url, blob


@pytest.mark.parametrize("setting", [None, "asyncio"], ids=["default", "asyncio"])
def test_the_mirror_sends_a_cached_blob_by_sendfile_on_its_loop(
    setting: str | None, tmp_path: Path, registry: tuple[str, Blob]
) -> None:
    """By default on uvloop where it is installed; `event_loop: asyncio` turns it off."""
    url, blob = registry
    config = tmp_path / "mirror.yml"
    config.write_text(json.dumps({"event_loop": setting} if setting else {}) + "\n")
    with MirrorProcess(tmp_path, url, extra_args=("--config", str(config))) as mirror:
        assert runs_uvloop(mirror.pid) == (setting is None and HAVE_UVLOOP)
        path = f"/v2/library/big/blobs/{blob.digest}"
        with Conn(mirror.port) as conn:
            for _ in range(2):  # from the download, then from the cache (kept alive)
                status, headers = conn.get(path)
                assert status == 200 and int(headers["content-length"]) == blob.size
                assert f"sha256:{conn.digest(blob.size)}" == blob.digest
            status, headers = conn.get(path, {"Range": "bytes=1000001-"})
            assert status == 206 and blob.data is not None
            assert conn.read(blob.size - 1000001) == blob.data[1000001:]
            status, headers = conn.get("/v2/")
            assert status == 200
