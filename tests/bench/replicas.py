"""Replicas in the bench: three mirrors on one bucket and one Redis, behind haproxy.

    lb1 ─► r0            lb2 ─► r0, r1            lb3 ─► r0, r1, r2   (round robin)
    every replica: local tier + the shared RGW bucket, the shared Redis, `cluster:` set

Cold: 24 concurrent GETs of one fresh 512 MiB blob through lb3 (spread over the three
replicas) against 8 concurrent GETs of another fresh blob sent to one replica, in the same
rounds; the upstream counts its fetches. Manifests: wrk on a tag through lb1, lb2, lb3 with
the CPU seconds each process (replicas and haproxy) used during the run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.clients import WrkResult, curl_together, wrk, wrk_script
from tests.bench.measure import manifest_digest
from tests.bench.report import Row, median, ratio
from tests.bench.seeding import BigBlob, seed_big
from tests.loadbalancer import HAProxy
from tests.procmem import cpu_seconds
from tests.rgw import CephRGW
from tests.services import FakeHubProcess, MirrorProcess

Log = Callable[[str], None]
REPLICAS = 3
PREFIX = "replicas/"


@dataclass
class ReplicaStack:
    replicas: list[MirrorProcess]
    balancers: dict[int, HAProxy]  # replica count -> haproxy over the first n replicas


def _config(workdir: Path, url: str, rgw: CephRGW, bucket: str, secret: Path) -> Path:
    s3_secret = workdir / "s3-secret"
    s3_secret.write_text(rgw.secret_key + "\n")
    config = {
        "storage": {
            "s3": {
                "endpoint": rgw.endpoint,
                "bucket": bucket,
                "region": rgw.region,
                "prefix": PREFIX,
                "path_style": True,
                "access_key_id": rgw.access_key,
                "secret_access_key_file": str(s3_secret),
            }
        },
        "cluster": {"advertise_url": url, "secret_file": str(secret), "lease_ttl": "10s"},
    }
    path = workdir / "mirror.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def start(
    es: ExitStack, workdir: Path, hub: FakeHubProcess, rgw: CephRGW, redis_url: str, log: Log
) -> ReplicaStack:
    bucket = rgw.new_bucket_name()
    rgw.s3().create_bucket(bucket)
    secret = workdir / "cluster-secret"
    secret.write_text(os.urandom(24).hex() + "\n")
    replicas = []
    for index in range(REPLICAS):
        replica = MirrorProcess(workdir / f"replica{index}", hub.registry_url, redis_url)
        config = _config(replica.workdir, replica.url, rgw, bucket, secret)
        replica.extra_args = ("--config", str(config))
        replicas.append(es.enter_context(replica))
    balancers = {
        n: es.enter_context(HAProxy(workdir / f"lb{n}", [r.url for r in replicas[:n]]))
        for n in range(1, REPLICAS + 1)
    }
    log(f"replicas {', '.join(r.url for r in replicas)}; "
        f"haproxy {', '.join(f'{n}: {lb.url}' for n, lb in balancers.items())}")  # fmt: skip
    return ReplicaStack(replicas, balancers)


def seed(upstream_url: str, runs: int, size: int, log: Log) -> list[tuple[BigBlob, BigBlob]]:
    """Per cold run, two blobs new to every cache: one for the 3 replicas, one for 1."""
    pairs = []
    for run in range(runs):
        pairs.append((seed_big(upstream_url, 200 + 2 * run, size),
                      seed_big(upstream_url, 201 + 2 * run, size)))  # fmt: skip
        log(f"  seeded the replica bench's cold blobs, run {run + 1}")
    return pairs


# --- cold -----------------------------------------------------------------------------------


@dataclass
class ReplicaCold:
    three: list[float] = field(default_factory=list)  # wall, 24 GETs over 3 replicas
    one: list[float] = field(default_factory=list)  # wall, 8 GETs on one replica
    fetches_three: list[int] = field(default_factory=list)
    fetches_one: list[int] = field(default_factory=list)


def _fetches(hub: FakeHubProcess, digest: str) -> int:
    time.sleep(0.5)  # a straggling upstream fetch is still counted
    return int(hub.stats()["cdn_get_by_digest"].get(digest, 0))


def cold(s: ReplicaStack, hub: FakeHubProcess, pairs: list[tuple[BigBlob, BigBlob]],
         log: Log) -> ReplicaCold:  # fmt: skip
    out = ReplicaCold()
    for run, (spread, single) in enumerate(pairs):
        hub.reset()
        wall, _ = curl_together(s.balancers[3].url + spread.path(), spread.size, 24)
        out.three.append(wall)
        out.fetches_three.append(_fetches(hub, spread.digest))
        hub.reset()
        wall, _ = curl_together(s.replicas[0].url + single.path(), single.size, 8)
        out.one.append(wall)
        out.fetches_one.append(_fetches(hub, single.digest))
        log(f"  run {run + 1}: 24 GETs over 3 replicas {out.three[-1]:.2f}s "
            f"({out.fetches_three[-1]} upstream fetches), 8 GETs on 1 replica "
            f"{out.one[-1]:.2f}s ({out.fetches_one[-1]})")  # fmt: skip
    return out


# --- manifests ------------------------------------------------------------------------------


@dataclass
class ReplicaManifests:
    results: dict[int, list[WrkResult]] = field(default_factory=dict)  # replicas -> runs
    # replicas -> per run, CPU seconds of each replica process and of haproxy
    cpu: dict[int, list[dict[str, float]]] = field(default_factory=dict)


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
            pids = {f"replica{i}": r.pid for i, r in enumerate(s.replicas[:n])}
            pids["haproxy"] = lb.pid
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            result = wrk(lb.url + path, script, seconds)
            used = {name: round(cpu_seconds(pid) - before[name], 2) for name, pid in pids.items()}
            out.results.setdefault(n, []).append(result)
            out.cpu.setdefault(n, []).append(used)
            log(f"  run {run + 1}/{runs} {n} replica(s): {result.rps:,.0f} req/s, "
                f"p99 {result.p99_ms:.1f} ms, {result.errors} errors, CPU s {used}")  # fmt: skip
    return out


# --- rows -----------------------------------------------------------------------------------


def cold_rows(c: ReplicaCold, size_mib: int) -> list[Row]:
    three, one = median(c.three), median(c.one)
    worst = float(max(c.fetches_three))
    return [
        Row(f"replicas: cold 24× GET {size_mib} MiB over 3: upstream fetches, worst run",
            "fetches", worst, None, None, worst, "eq", 1.0, "exactly 1"),
        Row(f"replicas: cold 24× GET {size_mib} MiB over 3 behind haproxy: all done", "s",
            three, None, one, ratio(three, one), "le", 1.5,
            "≤ 1.5× 8× GET on 1 replica, same run"),
    ]  # fmt: skip


def manifest_rows(m: ReplicaManifests, p99_limit_ms: float) -> list[Row]:
    rps = {n: median([r.rps for r in runs]) for n, runs in m.results.items()}
    p99 = {n: median([r.p99_ms for r in runs]) for n, runs in m.results.items()}
    rows = []
    for n in sorted(rps):
        cpu = {k: median([run[k] for run in m.cpu[n]]) for k in m.cpu[n][0]}
        shown = ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
        rows.append(Row(f"replicas: manifest GET by tag via haproxy, {n} replica(s)", "req/s",
                        rps[n], None, rps[1], ratio(rps[n], rps[1]), "ge", 0.8,
                        f"≥ 0.8× 1 replica (CPU s: {shown})"))  # fmt: skip
        rows.append(Row(f"replicas: manifest GET by tag p99, {n} replica(s)", "ms", p99[n],
                        None, None, ratio(p99[n], p99_limit_ms), "lt", 1.0,
                        f"< {p99_limit_ms:.0f} ms"))  # fmt: skip
    return rows
