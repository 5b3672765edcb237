"""Replicas in the bench: three mirrors on one bucket and one Redis, behind haproxy.

    lb1 ─► r0            lb2 ─► r0, r1            lb3 ─► r0, r1, r2   (round robin)
                                                   lb3 ─► nginx        (a second frontend)
    every replica: local tier + the shared RGW bucket, the shared Redis, `cluster:` set,
    and the bench's production config (audit, pull policy: mirrorconfig.py)

Cold: 24 concurrent GETs of one fresh 512 MiB blob through lb3 (spread over the three
replicas), held to what every byte must cross anyway: 24 concurrent GETs of the same bytes
from nginx through the same haproxy process (its second frontend), plus one direct fetch
from the upstream (its share, which no mirror can go below), in the same rounds; the
upstream counts its fetches. Manifests: wrk on a tag through lb1, lb2, lb3. Every timed
part records the CPU seconds of each process in it (tests/bench/cpu.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tests.bench.clients import WrkResult, curl_together, wrk, wrk_script
from tests.bench.cpu import CpuMeter, Procs, Used, alone, median_used, tree
from tests.bench.freshwrite import fresh_write
from tests.bench.freshwrite import side as fresh_side
from tests.bench.measure import manifest_digest, metered_direct_fetch
from tests.bench.mirrorconfig import check_production, write_config
from tests.bench.report import Row, limit_row, median, ratio
from tests.bench.seeding import BigBlob, seed_big
from tests.bench.settle import settle
from tests.loadbalancer import HAProxy
from tests.rgw import CephRGW
from tests.services import FakeHubProcess, MirrorProcess, RedisServer, free_port

Log = Callable[[str], None]
REPLICAS = 3
CLIENTS = 24
PREFIX = "replicas/"


class HAProxyWithNginx(HAProxy):
    """haproxy over the replicas, with a second frontend (`nginx_url`) onto nginx: the
    reference's bytes cross the same haproxy process as the replicas'."""

    def __init__(self, workdir: Path, backends: list[str], nginx: str) -> None:
        super().__init__(workdir, backends)
        self.nginx = urlsplit(nginx)
        self.nginx_port = free_port()
        self.nginx_url = f"http://127.0.0.1:{self.nginx_port}"

    def config_text(self) -> str:
        return super().config_text() + "\n".join(
            [
                "frontend nginx",
                f"    bind 127.0.0.1:{self.nginx_port}",
                "    default_backend nginx",
                "backend nginx",
                f"    server n0 {self.nginx.hostname}:{self.nginx.port}",
                "",
            ]
        )


@dataclass
class ReplicaStack:
    replicas: list[MirrorProcess]
    balancers: dict[int, HAProxy]  # replica count -> haproxy over the first n replicas
    spread: HAProxyWithNginx  # balancers[REPLICAS], with the nginx frontend
    redis: RedisServer
    rgw: CephRGW

    def procs(self, n: int) -> Procs:
        """The first n replicas, the haproxy in front of them, their Redis and RGW."""
        procs = {f"replica{i}": tree(r.pid) for i, r in enumerate(self.replicas[:n])}
        procs["haproxy"] = tree(self.balancers[n].pid)
        procs["redis"] = alone(self.redis.pid)
        procs.update((name, alone(pid)) for name, pid in self.rgw.pids().items())
        return procs


def _config(replica: MirrorProcess, rgw: CephRGW, bucket: str, secret: Path) -> Path:
    s3_secret = replica.workdir / "s3-secret"
    s3_secret.write_text(rgw.secret_key + "\n")
    s3 = {
        "endpoint": rgw.endpoint,
        "bucket": bucket,
        "region": rgw.region,
        "prefix": PREFIX,
        "path_style": True,
        "access_key_id": rgw.access_key,
        "secret_access_key_file": str(s3_secret),
    }
    cluster = {"advertise_url": replica.url, "secret_file": str(secret), "lease_ttl": "10s"}
    path = replica.workdir / "mirror.yaml"
    return write_config(path, replica.upstream, storage={"s3": s3}, cluster=cluster)


def start(
    es: ExitStack, workdir: Path, hub: FakeHubProcess, rgw: CephRGW, nginx_url: str, log: Log
) -> ReplicaStack:
    """The replicas (with their own Redis), lb1..lb3, and lb3's frontend onto nginx_url."""
    redis = es.enter_context(RedisServer(workdir / "redis-replicas"))
    bucket = rgw.new_bucket_name()
    rgw.s3().create_bucket(bucket)
    secret = workdir / "cluster-secret"
    secret.write_text(os.urandom(24).hex() + "\n")
    replicas = []
    for index in range(REPLICAS):
        replica = MirrorProcess(workdir / f"replica{index}", hub.registry_url, redis.url)
        replica.extra_args = ("--config", str(_config(replica, rgw, bucket, secret)))
        replicas.append(es.enter_context(replica))
        check_production(replica)
    urls = [r.url for r in replicas]
    balancers: dict[int, HAProxy] = {
        n: es.enter_context(HAProxy(workdir / f"lb{n}", urls[:n])) for n in range(1, REPLICAS)
    }
    spread = es.enter_context(HAProxyWithNginx(workdir / f"lb{REPLICAS}", urls, nginx_url))
    balancers[REPLICAS] = spread
    log(f"replicas {', '.join(urls)}; "
        f"haproxy {', '.join(f'{n}: {lb.url}' for n, lb in balancers.items())}, "
        f"nginx through lb{REPLICAS} {spread.nginx_url}")  # fmt: skip
    return ReplicaStack(replicas, balancers, spread, redis, rgw)


def seed(upstream_url: str, runs: int, size: int, log: Log) -> list[BigBlob]:
    """Per cold run, one blob new to every cache."""
    blobs = []
    for run in range(runs):
        blobs.append(seed_big(upstream_url, 200 + run, size))
        log(f"  seeded the replica bench's cold blob, run {run + 1}")
    return blobs


# --- cold -----------------------------------------------------------------------------------

# What a cold run is held to: nginx's processes (its file is big0.bin, the size of every
# bench blob), and (the blob fetched straight from the upstream, the upstream's processes).
Reference = tuple[Procs, tuple[BigBlob, Procs]]
SPREAD, NGINX, DIRECT = f"{REPLICAS} replicas", "nginx via haproxy", "direct fetch"
FRESH = "new file"


@dataclass
class ReplicaCold:
    spread: list[float] = field(default_factory=list)  # wall, 24 GETs over 3 replicas
    nginx: list[float] = field(default_factory=list)  # wall, 24 GETs of nginx's file via lb3
    direct: list[float] = field(default_factory=list)  # one GET straight from the upstream
    fetches: list[int] = field(default_factory=list)  # upstream fetches, 24 GETs over 3
    fresh: list[float] = field(default_factory=list)  # the blob's size into a new file
    # SPREAD / NGINX / DIRECT / FRESH -> per run, CPU seconds by process
    cpu: dict[str, list[Used]] = field(default_factory=dict)

    def add_cpu(self, side: str, used: Used) -> None:
        self.cpu.setdefault(side, []).append(used)


def _fetches(hub: FakeHubProcess, digest: str) -> int:
    time.sleep(0.5)  # a straggling upstream fetch is still counted
    return int(hub.stats()["cdn_get_by_digest"].get(digest, 0))


def cold(
    s: ReplicaStack,
    hub: FakeHubProcess,
    blobs: list[BigBlob],
    reference: Reference,
    log: Log,
    scratch: Path,
) -> ReplicaCold:
    """Per run: one direct fetch, 24 GETs of nginx's file through lb3's second frontend,
    24 GETs of a blob new to every replica through lb3, then the blob's size written into
    a new file in `scratch`."""
    nginx_procs, (direct_blob, upstream) = reference
    out = ReplicaCold()
    for run, blob in enumerate(blobs):
        seconds, used = metered_direct_fetch(hub, direct_blob, upstream)
        out.direct.append(seconds)
        out.add_cpu(DIRECT, used)
        nginx = {"haproxy": tree(s.spread.pid), **nginx_procs}
        settle()
        with CpuMeter(nginx, "curl") as cpu:
            url = f"{s.spread.nginx_url}/big0.bin"
            out.nginx.append(curl_together(url, direct_blob.size, CLIENTS)[0])
        out.add_cpu(NGINX, cpu.used)
        settle()
        hub.reset()
        with CpuMeter({**s.procs(REPLICAS), **upstream}, "curl") as cpu:
            wall, _ = curl_together(s.spread.url + blob.path(), blob.size, CLIENTS)
        out.add_cpu(SPREAD, cpu.used)
        out.spread.append(wall)
        out.fetches.append(_fetches(hub, blob.digest))
        # After the replicas' part, as in every cold row (freshwrite.py).
        seconds, used = fresh_write(scratch, blob.size)
        out.fresh.append(seconds)
        out.add_cpu(FRESH, used)
        log(f"  run {run + 1}: {CLIENTS} GETs over {SPREAD} {wall:.2f}s "
            f"({out.fetches[-1]} upstream fetches), CPU s {cpu.used}; {CLIENTS} GETs of "
            f"nginx via haproxy {out.nginx[-1]:.2f}s; direct {out.direct[-1]:.2f}s; "
            f"new file {out.fresh[-1]:.2f}s")  # fmt: skip
    return out


# --- manifests ------------------------------------------------------------------------------


@dataclass
class ReplicaManifests:
    results: dict[int, list[WrkResult]] = field(default_factory=dict)  # replicas -> runs
    # replicas -> per run, CPU seconds of each replica, haproxy, Redis, RGW and wrk
    cpu: dict[int, list[Used]] = field(default_factory=dict)


def manifests(
    s: ReplicaStack, workdir: Path, runs: int, seconds: int, log: Log
) -> ReplicaManifests:
    out = ReplicaManifests()
    script = wrk_script(workdir, "GET")
    path = "/v2/library/layers20/manifests/latest"
    for replica in s.replicas:  # every replica's hot set holds the tag before the runs
        manifest_digest(replica.url + path)
    for run in range(runs):
        for n, lb in s.balancers.items():
            with CpuMeter(s.procs(n), "wrk") as cpu:
                result = wrk(lb.url + path, script, seconds)
            out.results.setdefault(n, []).append(result)
            out.cpu.setdefault(n, []).append(cpu.used)
            log(f"  run {run + 1}/{runs} {n} replica(s): {result.rps:,.0f} req/s, "
                f"p99 {result.p99_ms:.1f} ms, {result.errors} errors, "
                f"CPU s {cpu.used}")  # fmt: skip
    return out


# --- rows -----------------------------------------------------------------------------------


def cold_rows(c: ReplicaCold, size_mib: int) -> list[Row]:
    spread, nginx, direct = median(c.spread), median(c.nginx), median(c.direct)
    reference = nginx + direct
    worst = float(max(c.fetches))
    name = f"replicas: cold {CLIENTS}× GET {size_mib} MiB over {REPLICAS}"
    cpu = {side: median_used(c.cpu[side]) for side in (SPREAD, NGINX, DIRECT)}
    cpu[fresh_side(size_mib, median(c.fresh))] = median_used(c.cpu[FRESH])
    return [
        Row(f"{name}: upstream fetches, worst run", "fetches", worst, None, 1.0, worst, "eq",
            1.0, "exactly 1"),
        Row(f"{name} behind haproxy: all done", "s", spread, None, reference,
            ratio(spread, reference), "le", 1.25,
            f"≤ 1.25× ({CLIENTS}× nginx via the same haproxy {nginx:.2f} s + one direct "
            f"fetch {direct:.2f} s)", cpu),
    ]  # fmt: skip


def manifest_rows(m: ReplicaManifests, p99_limit_ms: float) -> list[Row]:
    rps = {n: median([r.rps for r in runs]) for n, runs in m.results.items()}
    p99 = {n: median([r.p99_ms for r in runs]) for n, runs in m.results.items()}
    rows = []
    for n in sorted(rps):
        cpu = {f"{n} replica(s)": median_used(m.cpu[n])}
        rows.append(Row(f"replicas: manifest GET by tag via haproxy, {n} replica(s)", "req/s",
                        rps[n], None, rps[1], ratio(rps[n], rps[1]), "ge", 0.8,
                        "≥ 0.8× 1 replica", cpu))  # fmt: skip
        rows.append(limit_row(f"replicas: manifest GET by tag p99, {n} replica(s)", "ms",
                              p99[n], p99_limit_ms, f"< {p99_limit_ms:.0f} ms"))  # fmt: skip
    return rows
