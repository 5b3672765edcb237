"""`workers: 2` in the bench: one mirror of two worker processes beside the 1-process one.

    mirror-2w   workers: 2, plain HTTP and HTTPS (a private CA), its own Redis and cache
    nginx-tls   the warm blob's bytes over HTTPS with the same certificate

Manifests: wrk on a tag, the 2-worker mirror and the 1-process one in turn. Cold: 8
concurrent GETs of a blob new to the 2-worker mirror, held to nginx serving the same bytes
to 8 clients plus one direct fetch (the upstream's share). Warm: one GET of the cached blob
over HTTPS against nginx over HTTPS. Memory: each worker's largest RSS over the phases.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.clients import CURL_FORMAT, BenchError, Fetch, curl_together, wrk, wrk_script
from tests.bench.measure import cdn_fetches, direct_fetch, manifest_digest, warm_up
from tests.bench.nginx import NginxServer
from tests.bench.report import MIB, Row, median, ratio
from tests.bench.seeding import BigBlob, seed_big
from tests.certs import CA, Pair, TLSMirror
from tests.procmem import descendants, rss_bytes
from tests.services import FakeHubProcess, MirrorProcess, RedisServer

Log = Callable[[str], None]
WORKERS = 2
RSS_WORKER_LIMIT_MIB = 128


class TlsNginx(NginxServer):
    """nginx as the bench runs it, but over HTTPS with the mirror's certificate."""

    def __init__(self, workdir: Path, root: Path, pair: Pair) -> None:
        super().__init__(workdir, root)
        self.pair = pair
        self.url = f"https://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        listen = f"listen 127.0.0.1:{self.port};"
        tls = (
            f"listen 127.0.0.1:{self.port} ssl; ssl_certificate {self.pair.cert}; "
            f"ssl_certificate_key {self.pair.key};"
        )
        return super().config_text().replace(listen, tls)

    def is_ready(self) -> bool:
        done = subprocess.run(
            ["curl", "-sk", "-o", "/dev/null", f"{self.url}/"], capture_output=True, timeout=10
        )
        return done.returncode == 0


class WorkerRss:
    """The largest RSS of every worker process below the supervisor, sampled in a thread."""

    def __init__(self, supervisor: int, interval: float = 0.2) -> None:
        self.supervisor = supervisor
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in descendants(self.supervisor) - {self.supervisor}:
                self.peaks[pid] = max(self.peaks.get(pid, 0), rss_bytes(pid))
            self._stop.wait(self.interval)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


@dataclass
class WorkersStack:
    mirror: TLSMirror
    nginx_tls: TlsNginx
    ca: CA
    fresh: list[BigBlob]
    rss: WorkerRss


def start(
    es: ExitStack,
    workdir: Path,
    upstream: str,
    hub: FakeHubProcess,
    runs: int,
    size: int,
    log: Log,
) -> WorkersStack:
    """The 2-worker mirror, nginx over TLS (serving workdir/www), and fresh cold blobs."""
    fresh = [seed_big(upstream, 300 + run, size) for run in range(runs)]
    log(f"  seeded {runs} cold blobs for the 2-worker mirror")
    ca = CA(workdir / "ca")
    pair = ca.issue("mirror-2w")
    redis = es.enter_context(RedisServer(workdir / "redis-2w"))
    tls = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
    mirror = TLSMirror(workdir / "mirror-2w", hub.registry_url, ca.cert, tls,
                       {"workers": WORKERS})  # fmt: skip
    mirror.redis_url = redis.url
    es.enter_context(mirror)
    nginx_tls = es.enter_context(TlsNginx(workdir / "nginx-tls", workdir / "www", pair))
    log(f"2-worker mirror {mirror.url} and {mirror.tls_url}; nginx over TLS {nginx_tls.url}")
    return WorkersStack(mirror, nginx_tls, ca, fresh, WorkerRss(mirror.pid))


# --- manifests ------------------------------------------------------------------------------


def manifests(
    s: WorkersStack, single: MirrorProcess, workdir: Path, runs: int, seconds: int, log: Log
) -> dict[str, list[float]]:
    """wrk req/s on one tag: the 1-process mirror and the 2-worker one, interleaved."""
    path = "/v2/library/layers20/manifests/latest"
    urls = {"1 process": single.url + path, "2 workers": s.mirror.url + path}
    for url in urls.values():
        manifest_digest(url)
    script = wrk_script(workdir, "GET")
    out: dict[str, list[float]] = {label: [] for label in urls}
    for run in range(runs):
        for label, url in urls.items():
            time.sleep(1)
            result = wrk(url, script, seconds)
            if result.errors:
                raise BenchError(f"wrk {url}: {result.errors} errors")
            out[label].append(result.rps)
            log(f"  run {run + 1}/{runs} manifest GET, {label}: {result.rps:,.0f} req/s")
    return out


def manifest_rows(rps: dict[str, list[float]]) -> list[Row]:
    two, one = median(rps["2 workers"]), median(rps["1 process"])
    return [
        Row(f"manifest GET by tag, {WORKERS} workers", "req/s", two, None, None,
            ratio(two, one), "ge", 1.4, f"≥ 1.4× 1 process ({one:,.0f})"),
    ]  # fmt: skip


# --- cold -----------------------------------------------------------------------------------


@dataclass
class WorkersCold:
    walls: list[float] = field(default_factory=list)
    fetches: list[int] = field(default_factory=list)
    nginx: list[float] = field(default_factory=list)  # 8 clients on the nginx file
    direct: list[float] = field(default_factory=list)


def cold(
    s: WorkersStack, hub: FakeHubProcess, nginx_url: str, warm: BigBlob, clients: int, log: Log
) -> WorkersCold:
    out = WorkersCold()
    for run, blob in enumerate(s.fresh):
        out.direct.append(direct_fetch(hub, warm))
        out.nginx.append(curl_together(nginx_url, warm.size, clients)[0])
        hub.reset()
        wall, _ = curl_together(s.mirror.url + blob.path(), blob.size, clients)
        time.sleep(0.5)  # a straggling upstream fetch is still counted
        out.walls.append(wall)
        out.fetches.append(cdn_fetches(hub, blob.digest))
        log(f"  run {run + 1} 2 workers: {wall:.2f}s, {out.fetches[-1]} upstream fetches; "
            f"nginx {out.nginx[-1]:.2f}s, direct {out.direct[-1]:.2f}s")  # fmt: skip
    return out


def cold_rows(cold: WorkersCold, clients: int, size_mib: int) -> list[Row]:
    wall = median(cold.walls)
    reference = median(cold.nginx) + median(cold.direct)
    name = f"cold {clients}× GET of one {size_mib} MiB blob, {WORKERS} workers"
    return [
        Row(f"{name}: upstream fetches, worst run", "fetches", float(max(cold.fetches)), None,
            None, float(max(cold.fetches)), "eq", 1.0, "exactly 1"),
        Row(f"{name}: all done", "s", wall, None, reference, ratio(wall, reference), "le",
            1.25, f"≤ 1.25× (nginx {clients}× + one direct fetch)"),
    ]  # fmt: skip


# --- warm over TLS --------------------------------------------------------------------------


def curl_tls(url: str, size: int, ca: Path) -> Fetch:
    cmd = ["curl", "-s", "--noproxy", "*", "--cacert", str(ca), "-o", "/dev/null",
           "-w", CURL_FORMAT, url]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise BenchError(f"curl {url}: exit {done.returncode} {done.stderr.strip()}")
    status, got, seconds = done.stdout.split()
    return Fetch(int(status), int(got), float(seconds)).check(url, size)


def warm_tls(
    s: WorkersStack, hub: FakeHubProcess, warm: BigBlob, runs: int
) -> dict[str, list[float]]:
    warm_up(s.mirror.url + warm.path(), warm, hub)
    urls = {"mirror": s.mirror.tls_url + warm.path(), "nginx": f"{s.nginx_tls.url}/big0.bin"}
    out: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(runs):
        for name, url in urls.items():
            out[name].append(curl_tls(url, warm.size, s.ca.cert).seconds)
    return out


def warm_tls_rows(seconds: dict[str, list[float]], size_mib: int) -> list[Row]:
    m, n = median(seconds["mirror"]), median(seconds["nginx"])
    return [
        Row(f"warm {size_mib} MiB GET over HTTPS, {WORKERS} workers", "s", m, None, n,
            ratio(m, n), "le", 1.1, "≤ 1.1× nginx over TLS"),
    ]  # fmt: skip


def rss_rows(peaks: dict[int, int]) -> list[Row]:
    worst = max(peaks.values(), default=0) / MIB
    return [
        Row(f"RSS per worker, max of {len(peaks)}", "MiB", worst, None, None,
            worst / RSS_WORKER_LIMIT_MIB, "lt", 1.0, f"< {RSS_WORKER_LIMIT_MIB} MiB"),
    ]  # fmt: skip
