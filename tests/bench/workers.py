"""`workers: 2` in the bench: one mirror of two worker processes beside the 1-worker one.

    mirror-2w   workers: 2, plain HTTP and HTTPS (a private CA), its own Redis and cache
    nginx-tls   the warm blob's bytes over HTTPS with the same certificate

Both mirrors run the bench's production config (audit, pull policy: mirrorconfig.py).
Manifests: wrk on a tag, the 2-worker mirror and the 1-worker one in turn, held to the
1-worker figure. Cold: 8 concurrent GETs of a blob new to the 2-worker mirror, held to
nginx serving the same bytes to 8 concurrent clients plus one direct fetch from the upstream
(its share, which no mirror can go below), in the same rounds. Warm: one GET of the cached
blob over HTTPS against nginx over HTTPS. Memory: each worker's largest RSS over the phases.
Every timed part records the CPU seconds of each process in it (tests/bench/cpu.py).
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
from tests.bench.cpu import CpuMeter, Procs, Used, alone, median_used, tree, workers
from tests.bench.freshwrite import fresh_write
from tests.bench.freshwrite import side as fresh_side
from tests.bench.measure import (
    cdn_fetches,
    manifest_digest,
    metered_direct_fetch,
    warm_up,
)
from tests.bench.mirrorconfig import PRODUCTION, check_production, production
from tests.bench.nginx import NginxServer
from tests.bench.report import MIB, Row, limit_row, median, ratio
from tests.bench.seeding import BigBlob, seed_big
from tests.bench.settle import settle
from tests.certs import CA, Pair, TLSMirror
from tests.procmem import descendants, rss_bytes
from tests.services import FakeHubProcess, RedisServer

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
    redis: RedisServer
    nginx_tls: TlsNginx
    ca: CA
    fresh: list[BigBlob]
    rss: WorkerRss

    def procs(self) -> Procs:
        """The supervisor, each worker, and their Redis."""
        return {**workers("", self.mirror.pid), "redis": alone(self.redis.pid)}


def start(
    es: ExitStack,
    workdir: Path,
    upstream: str,
    hub: FakeHubProcess,
    runs: int,
    size: int,
    log: Log,
) -> WorkersStack:
    """The 2-worker mirror, nginx over TLS (serving workdir/www), and `runs` fresh blobs."""
    fresh = [seed_big(upstream, 300 + run, size) for run in range(runs)]
    log(f"  seeded {runs} cold blobs for the 2-worker mirror")
    ca = CA(workdir / "ca")
    pair = ca.issue("mirror-2w")
    redis = es.enter_context(RedisServer(workdir / "redis-2w"))
    tls = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
    config = {"workers": WORKERS, **production(hub.registry_url)}
    mirror = TLSMirror(workdir / "mirror-2w", hub.registry_url, ca.cert, tls, config)
    mirror.redis_url = redis.url
    es.enter_context(mirror)
    check_production(mirror)
    nginx_tls = es.enter_context(TlsNginx(workdir / "nginx-tls", workdir / "www", pair))
    log(f"2-worker mirror {mirror.url} and {mirror.tls_url}; nginx over TLS {nginx_tls.url}")
    return WorkersStack(mirror, redis, nginx_tls, ca, fresh, WorkerRss(mirror.pid))


# --- manifests ------------------------------------------------------------------------------

ONE, TWO = "1 worker", f"{WORKERS} workers"


@dataclass
class WorkersManifests:
    rps: dict[str, list[float]] = field(default_factory=dict)  # ONE / TWO -> per run
    cpu: dict[str, list[Used]] = field(default_factory=dict)  # ONE / TWO -> per run


def manifests(
    s: WorkersStack, one: tuple[str, Procs], workdir: Path, runs: int, seconds: int, log: Log
) -> WorkersManifests:
    """wrk req/s on one tag: the 1-worker mirror (its URL and processes) and the 2-worker
    one, interleaved."""
    path = "/v2/library/layers20/manifests/latest"
    targets = {ONE: (one[0] + path, one[1]), TWO: (s.mirror.url + path, s.procs())}
    for url, _ in targets.values():
        manifest_digest(url)
    script = wrk_script(workdir, "GET")
    out = WorkersManifests({label: [] for label in targets}, {label: [] for label in targets})
    for run in range(runs):
        for label, (url, procs) in targets.items():
            time.sleep(1)
            with CpuMeter(procs, "wrk") as cpu:
                result = wrk(url, script, seconds)
            if result.errors:
                raise BenchError(f"wrk {url}: {result.errors} errors")
            out.rps[label].append(result.rps)
            out.cpu[label].append(cpu.used)
            log(f"  run {run + 1}/{runs} manifest GET, {label}: {result.rps:,.0f} req/s, "
                f"CPU s {cpu.used}")  # fmt: skip
    return out


def manifest_rows(m: WorkersManifests) -> list[Row]:
    two, one = median(m.rps[TWO]), median(m.rps[ONE])
    cpu = {label: median_used(m.cpu[label]) for label in (TWO, ONE)}
    return [
        Row(f"manifest GET by tag, {TWO}, {PRODUCTION}", "req/s", two, None, one,
            ratio(two, one), "ge", 1.4, f"≥ 1.4× {ONE}", cpu),
    ]  # fmt: skip


# --- cold -----------------------------------------------------------------------------------

# What a cold run is held to: (nginx's URL of the same bytes, its processes), and (the blob
# fetched straight from the upstream, the upstream's processes).
Reference = tuple[tuple[str, Procs], tuple[BigBlob, Procs]]


@dataclass
class WorkersCold:
    walls: list[float] = field(default_factory=list)
    fetches: list[int] = field(default_factory=list)
    nginx: list[float] = field(default_factory=list)  # as many clients on the nginx file
    direct: list[float] = field(default_factory=list)
    fresh: list[float] = field(default_factory=list)  # the blob's size into a new file
    # side (TWO, "nginx", "direct fetch", "fresh") -> per run, CPU seconds by process
    cpu: dict[str, list[Used]] = field(default_factory=dict)

    def add_cpu(self, side: str, used: Used) -> None:
        self.cpu.setdefault(side, []).append(used)


def cold(
    s: WorkersStack, hub: FakeHubProcess, reference: Reference, clients: int, log: Log
) -> WorkersCold:
    """Per run: one direct fetch, `clients` GETs of the file from nginx, `clients` GETs of
    a blob new to the 2-worker mirror, then the blob's size written into a new file."""
    (nginx_url, nginx_procs), (direct_blob, upstream) = reference
    out = WorkersCold()
    for run, blob in enumerate(s.fresh):
        seconds, used = metered_direct_fetch(hub, direct_blob, upstream)
        out.direct.append(seconds)
        out.add_cpu("direct fetch", used)
        settle()
        with CpuMeter(nginx_procs, "curl") as cpu:
            out.nginx.append(curl_together(nginx_url, direct_blob.size, clients)[0])
        out.add_cpu("nginx", cpu.used)
        settle()
        hub.reset()
        with CpuMeter({**s.procs(), **upstream}, "curl") as cpu:
            wall, _ = curl_together(s.mirror.url + blob.path(), blob.size, clients)
        out.add_cpu(TWO, cpu.used)
        time.sleep(0.5)  # a straggling upstream fetch is still counted
        out.walls.append(wall)
        out.fetches.append(cdn_fetches(hub, blob.digest))
        # After the mirror's part: the pages `dd` frees would otherwise be there for the
        # mirror to reuse before the host takes them back (freshwrite.py).
        seconds, used = fresh_write(s.mirror.workdir, blob.size)
        out.fresh.append(seconds)
        out.add_cpu("fresh", used)
        log(f"  run {run + 1} {TWO}: {wall:.2f}s, {out.fetches[-1]} upstream fetches, "
            f"CPU s {cpu.used}; nginx {out.nginx[-1]:.2f}s, "
            f"direct {out.direct[-1]:.2f}s; new file {out.fresh[-1]:.2f}s")  # fmt: skip
    return out


def cold_rows(cold: WorkersCold, clients: int, size_mib: int) -> list[Row]:
    wall, nginx, direct = median(cold.walls), median(cold.nginx), median(cold.direct)
    reference = nginx + direct
    worst = float(max(cold.fetches))
    name = f"cold {clients}× GET of one {size_mib} MiB blob, {TWO}"
    cpu = {TWO: median_used(cold.cpu[TWO]), f"nginx {clients}×": median_used(cold.cpu["nginx"]),
           "direct fetch": median_used(cold.cpu["direct fetch"]),
           fresh_side(size_mib, median(cold.fresh)): median_used(cold.cpu["fresh"])}  # fmt: skip
    return [
        Row(f"{name}: upstream fetches, worst run", "fetches", worst, None, 1.0, worst, "eq",
            1.0, "exactly 1"),
        Row(f"{name}: all done", "s", wall, None, reference, ratio(wall, reference), "le",
            1.25, f"≤ 1.25× (nginx {clients}× {nginx:.2f} s + one direct fetch {direct:.2f} s)",
            cpu),
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


@dataclass
class WarmTls:
    seconds: dict[str, list[float]] = field(default_factory=dict)  # "mirror" / "nginx"
    cpu: dict[str, list[Used]] = field(default_factory=dict)  # the same -> per GET


def warm_tls(s: WorkersStack, hub: FakeHubProcess, warm: BigBlob, runs: int) -> WarmTls:
    """Timed GETs of the cached blob over HTTPS, the 2-worker mirror and nginx in turn."""
    warm_up(s.mirror.url + warm.path(), warm, hub)
    targets = {
        "mirror": (s.mirror.tls_url + warm.path(), s.procs()),
        "nginx": (f"{s.nginx_tls.url}/big0.bin", {"nginx-tls": tree(s.nginx_tls.pid)}),
    }
    out = WarmTls({name: [] for name in targets}, {name: [] for name in targets})
    for _ in range(runs):
        for name, (url, procs) in targets.items():
            settle()
            with CpuMeter(procs, "curl") as cpu:
                out.seconds[name].append(curl_tls(url, warm.size, s.ca.cert).seconds)
            out.cpu[name].append(cpu.used)
    return out


def warm_tls_rows(w: WarmTls, size_mib: int) -> list[Row]:
    m, n = median(w.seconds["mirror"]), median(w.seconds["nginx"])
    cpu = {TWO: median_used(w.cpu["mirror"]), "nginx over TLS": median_used(w.cpu["nginx"])}
    return [
        Row(f"warm {size_mib} MiB GET over HTTPS, {TWO}", "s", m, None, n, ratio(m, n), "le",
            1.1, "≤ 1.1× nginx over TLS (same certificate)", cpu),
    ]  # fmt: skip


def rss_rows(peaks: dict[int, int]) -> list[Row]:
    worst = max(peaks.values(), default=0) / MIB
    return [
        limit_row(f"RSS per worker, max of {len(peaks)}", "MiB", worst, RSS_WORKER_LIMIT_MIB,
                  f"< {RSS_WORKER_LIMIT_MIB} MiB"),
    ]  # fmt: skip
