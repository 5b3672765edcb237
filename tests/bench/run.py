"""Start the servers, run the measurements, print and write the table of targets.

upstream: distribution (seeded) <- fake hub (token, 307 to its CDN)
mirror (+ redis) -> fake hub       peer: distribution proxy -> fake hub
nginx: the warm blob's bytes as a plain file
(+ the S3 backend's mirrors on Ceph RGW, 3 replicas behind haproxy, a 2-worker mirror)

Every mirror runs with the audit line and a pull policy, as in production. Each row shows
the reference its ratio divides by and the CPU seconds of every process in its timed part.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.bench import measure
from tests.bench import replicas as replicabench
from tests.bench import s3 as s3bench
from tests.bench import workers as workersbench
from tests.bench.chart import write_chart
from tests.bench.clients import OPENER
from tests.bench.cpu import Procs, alone, tree
from tests.bench.floor import FrameworkFloor
from tests.bench.freshwrite import page_reporting
from tests.bench.memory import RssSampler
from tests.bench.mirrorconfig import check_production, write_config
from tests.bench.nginx import NginxServer
from tests.bench.report import (
    MIB,
    NOTES,
    P99_LIMIT_MS,
    Row,
    cold_rows,
    docker_rows,
    manifest_rows,
    memory_rows,
    text_table,
    upstream_notes,
    warm_rows,
    write_json,
    write_markdown,
)
from tests.bench.seeding import BigBlob, seed_big, seed_layers20
from tests.services import (
    REPO_ROOT,
    DistributionRegistry,
    FakeHubProcess,
    MirrorProcess,
    RedisServer,
    log_tail,
    missing_tools,
)

T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=3, help="wrk, cold and docker runs (median)")
    p.add_argument("--warm-runs", type=int, default=5, help="timed warm blob GETs per server")
    p.add_argument("--wrk-seconds", type=int, default=10, help="length of one wrk run")
    p.add_argument("--blob-mib", type=int, default=512, help="size of each large blob")
    p.add_argument("--clients", type=int, default=8, help="concurrent cold GETs")
    p.add_argument("--no-docker", action="store_true", help="skip the docker pull measurement")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 backend (Ceph RGW) rows")
    p.add_argument("--no-replicas", action="store_true", help="skip the 3-replica rows")
    p.add_argument("--no-workers", action="store_true", help="skip the 2-worker rows")
    p.add_argument(
        "--only",
        action="append",
        choices=sorted(PHASES),
        help="run only this phase (repeatable), starting only what it needs; the memory rows "
        "come anyway",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy flame graph of the mirror per phase (slows the mirror down)",
    )
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, caches)")
    return only_what_is_needed(p.parse_args(argv))


def only_what_is_needed(args: argparse.Namespace) -> argparse.Namespace:
    """With --only, the stacks no chosen phase uses are not started (nor their blobs seeded)."""
    if args.only:
        chosen = set(args.only)
        args.no_workers |= not any(name.startswith("workers ") for name in chosen)
        args.no_replicas |= not any(name.startswith("replicas ") for name in chosen)
        args.no_s3 |= args.no_replicas and not chosen & {"cold blob", "s3 warm blob"}
    return args


def selected(args: argparse.Namespace, phase: str) -> bool:
    if phase == "docker pull" and args.no_docker:
        return False
    return not args.only or phase in args.only


@dataclass
class Stack:
    """The running servers and what the upstream holds."""

    workdir: Path
    hub: FakeHubProcess
    upstream: DistributionRegistry  # behind the fake hub
    redis: RedisServer  # the mirror's
    mirror: MirrorProcess
    peer: DistributionRegistry
    nginx: NginxServer
    warm: BigBlob
    fresh: list[BigBlob]  # one per cold run, new to the mirror and to the peer alike
    layers20: str  # the manifest digest of library/layers20:latest
    rss: RssSampler = field(init=False)
    s3: s3bench.S3Stack | None = None  # the S3 backend's mirrors, unless --no-s3
    replicas: replicabench.ReplicaStack | None = None  # 3 replicas + haproxy (needs s3)
    replica_blobs: list[BigBlob] = field(default_factory=list)
    workers: workersbench.WorkersStack | None = None  # workers: 2, unless --no-workers

    def upstream_procs(self) -> Procs:
        """The upstream: the fake hub (token, registry front, CDN) and the registry behind it."""
        return {"fakehub": tree(self.hub.pid), "registry": tree(self.upstream.pid)}

    def mirror_procs(self) -> Procs:
        return {"mirror": tree(self.mirror.pid), "redis": alone(self.redis.pid)}


def seed_upstream(url: str, workdir: Path, args: argparse.Namespace) -> tuple[BigBlob, ...]:
    """The warm blob (also written for nginx) and one fresh blob per cold run."""
    size = args.blob_mib * MIB
    www = workdir / "www"
    www.mkdir()
    blobs = [seed_big(url, 0, size, keep=www / "big0.bin")]
    cold_runs = args.runs if selected(args, "cold blob") else 0
    for index in range(1, cold_runs + 1):
        blobs.append(seed_big(url, index, size))
        log(f"  seeded library/big{index} ({args.blob_mib} MiB)")
    return tuple(blobs)


def start_stack(es: ExitStack, workdir: Path, args: argparse.Namespace) -> Stack:
    upstream = es.enter_context(DistributionRegistry(workdir / "upstream"))
    log(f"upstream registry {upstream.url}; seeding")
    layers20 = seed_layers20(upstream.url)
    warm, *fresh = seed_upstream(upstream.url, workdir, args)
    hub = es.enter_context(FakeHubProcess(upstream.url, workdir / "fakehub"))
    set_knobs(hub, ratelimit_remaining=10**9)  # the peer spends GETs; the limit is not measured
    redis = es.enter_context(RedisServer(workdir / "redis"))
    config = write_config(workdir / "mirror" / "mirror.yaml", hub.registry_url)
    mirror = MirrorProcess(workdir / "mirror", hub.registry_url, redis.url,
                           extra_args=["--config", str(config)])  # fmt: skip
    es.enter_context(mirror)
    check_production(mirror)
    peer = es.enter_context(DistributionRegistry(workdir / "peer", hub.registry_url))
    nginx = es.enter_context(NginxServer(workdir / "nginx", workdir / "www"))
    log(f"hub {hub.registry_url}, mirror {mirror.url}, peer {peer.url}, nginx {nginx.url}")
    stack = Stack(workdir, hub, upstream, redis, mirror, peer, nginx, warm, fresh, layers20)
    stack.rss = es.enter_context(RssSampler(mirror.pid))
    size = args.blob_mib * MIB
    if not args.no_s3 and s3bench.available():
        stack.s3 = s3bench.start(es, workdir, hub.registry_url, log)
        if not args.no_replicas:
            runs = args.runs if selected(args, "replicas cold blob") else 0
            stack.replica_blobs = replicabench.seed(upstream.url, runs, size, log)
            stack.replicas = replicabench.start(es, workdir, hub, stack.s3.rgw, nginx.url, log)
    if not args.no_workers:
        runs = args.runs if selected(args, "workers cold blob") else 0
        stack.workers = workersbench.start(es, workdir, upstream.url, hub, runs, size, log)
    return stack


def set_knobs(hub: FakeHubProcess, **knobs: Any) -> None:
    body = json.dumps(knobs).encode()
    req = urllib.request.Request(f"{hub.registry_url}/_knobs", data=body, method="POST")
    with OPENER.open(req, timeout=10):
        pass


@contextlib.contextmanager
def profiled(pid: int, path: Path | None) -> Iterator[None]:
    """py-spy records pid (and its children) while the block runs; SIGINT makes it write."""
    if path is None:
        yield
        return
    cmd = ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
           "--output", str(path)]  # fmt: skip
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


Phase = Callable[[Stack, argparse.Namespace], tuple[list[Row], Any]]


def phase_warm(s: Stack, args: argparse.Namespace) -> tuple[list[Row], Any]:
    path = s.warm.path()
    urls = {"mirror": (s.mirror.url + path, s.mirror_procs()),
            "peer": (s.peer.url + path, {"peer": tree(s.peer.pid)}),
            "nginx": (f"{s.nginx.url}/big0.bin", {"nginx": tree(s.nginx.pid)})}  # fmt: skip
    warm = measure.warm_blob(urls, s.warm, s.hub, args.warm_runs)
    return warm_rows(warm, args.blob_mib), warm


def phase_manifests(s: Stack, args: argparse.Namespace) -> tuple[list[Row], Any]:
    mirror = (s.mirror.url, s.mirror_procs())
    peer = (s.peer.url, {"peer": tree(s.peer.pid), **s.upstream_procs()})
    tag_path = "/v2/library/layers20/manifests/latest"
    _, body = measure.manifest_answer(s.mirror.url + tag_path)
    (s.nginx.root / "manifest.json").write_bytes(body)
    with FrameworkFloor(s.workdir / "floor", body) as floor:
        floors = {
            measure.NGINX_FILE: (f"{s.nginx.url}/manifest.json", {"nginx": tree(s.nginx.pid)}),
            measure.FRAMEWORK: (floor.url + tag_path, {"aiohttp": tree(floor.pid)}),
        }
        targets = measure.manifest_targets(mirror, peer, "library/layers20", floors)
        runs = measure.manifests(targets, s.hub, s.workdir, args.runs, args.wrk_seconds, log)
    return manifest_rows(runs), runs


def phase_cold(s: Stack, args: argparse.Namespace) -> tuple[list[Row], Any]:
    up = s.upstream_procs()
    bases = {"mirror": (s.mirror.url, {**s.mirror_procs(), **up}),
             "peer": (s.peer.url, {"peer": tree(s.peer.pid), **up})}  # fmt: skip
    if s.s3 is not None:
        bases["mirror-s3"] = (s.s3.mirror.url, {**s.s3.procs(), **up})
    cold = measure.cold(bases, s.fresh, (s.warm, up), s.hub, args.clients, log, s.mirror.workdir)
    rows = cold_rows(cold, args.clients, args.blob_mib)
    return rows + s3bench.cold_rows(cold, args.clients), cold


def phase_s3_warm(s: Stack, args: argparse.Namespace) -> tuple[list[Row], Any]:
    if s.s3 is None:
        return [], None
    warm = s3bench.warm(s.s3, s.warm, f"{s.nginx.url}/big0.bin", args.warm_runs, log)
    return s3bench.warm_rows(warm, args.blob_mib), warm


def phase_docker(s: Stack, args: argparse.Namespace) -> tuple[list[Row], Any]:
    mirrors = {"mirror": s.mirror.url, "peer": s.peer.url}
    image = ("layers20", s.layers20)
    pulls = measure.docker_pulls(mirrors, s.hub, s.workdir, image, args.runs, log)
    return docker_rows(pulls.seconds), pulls


def phase_replica_cold(s: Stack, args: argparse.Namespace) -> tuple[list[Row], Any]:
    if s.replicas is None:
        return [], None
    nginx = {"nginx": tree(s.nginx.pid)}
    direct = (s.warm, s.upstream_procs())
    cold = replicabench.cold(
        s.replicas, s.hub, s.replica_blobs, (nginx, direct), log, s.mirror.workdir
    )
    return replicabench.cold_rows(cold, args.blob_mib), cold


def phase_replica_manifests(s: Stack, args: argparse.Namespace) -> tuple[list[Row], Any]:
    if s.replicas is None:
        return [], None
    runs = replicabench.manifests(s.replicas, s.workdir, args.runs, args.wrk_seconds, log)
    return replicabench.manifest_rows(runs, P99_LIMIT_MS), runs


def phase_workers_manifests(s: Stack, args: argparse.Namespace) -> tuple[list[Row], Any]:
    if s.workers is None:
        return [], None
    one = (s.mirror.url, s.mirror_procs())
    runs = workersbench.manifests(s.workers, one, s.workdir, args.runs, args.wrk_seconds, log)
    return workersbench.manifest_rows(runs), runs


def phase_workers_cold(s: Stack, args: argparse.Namespace) -> tuple[list[Row], Any]:
    if s.workers is None:
        return [], None
    nginx = (f"{s.nginx.url}/big0.bin", {"nginx": tree(s.nginx.pid)})
    direct = (s.warm, s.upstream_procs())
    cold = workersbench.cold(s.workers, s.hub, (nginx, direct), args.clients, log)
    return workersbench.cold_rows(cold, args.clients, args.blob_mib), cold


def phase_workers_warm_tls(s: Stack, args: argparse.Namespace) -> tuple[list[Row], Any]:
    if s.workers is None:
        return [], None
    warm = workersbench.warm_tls(s.workers, s.hub, s.warm, args.warm_runs)
    return workersbench.warm_tls_rows(warm, args.blob_mib), warm


PHASES: dict[str, Phase] = {
    "warm blob": phase_warm,
    "manifests": phase_manifests,
    "cold blob": phase_cold,
    "s3 warm blob": phase_s3_warm,
    "replicas cold blob": phase_replica_cold,
    "replicas manifests": phase_replica_manifests,
    "docker pull": phase_docker,
    "workers manifests": phase_workers_manifests,
    "workers cold blob": phase_workers_cold,
    "workers warm tls": phase_workers_warm_tls,
}


def run_phases(
    stack: Stack, args: argparse.Namespace, out: Path
) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    # Other work on the machine skews every figure: the load average shows whether there was any.
    raw: dict[str, Any] = {"phase_seconds": {}, "loadavg_1min_after": {"start": os.getloadavg()[0]}}
    for name, phase in PHASES.items():
        if not selected(args, name):
            continue
        log(f"{name}")
        start = time.monotonic()
        profile = out / f"profile-{name.replace(' ', '-')}.svg" if args.profile else None
        with profiled(stack.mirror.pid, profile):
            phase_rows, raw[name] = phase(stack, args)
        rows += phase_rows
        raw["phase_seconds"][name] = round(time.monotonic() - start, 1)
        raw["loadavg_1min_after"][name] = os.getloadavg()[0]
    stack.rss.stop()
    rows += memory_rows(stack.rss.max_bytes, stack.rss.final_bytes)
    if stack.workers is not None:
        peaks = stack.workers.rss.stop()
        rows += workersbench.rss_rows(peaks)
        raw["worker_rss_peaks"] = peaks
    raw["rss_samples"] = stack.rss.samples
    if stack.s3 is not None:
        rows += s3bench.memory_rows(*stack.s3.stop_sampling())
    return rows, raw


def git_state() -> dict[str, str]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "mirror")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "mirror/ changes": "uncommitted" if dirty else "none"}  # fmt: skip


def summary(
    args: argparse.Namespace, started: datetime, rows: list[Row], raw: dict[str, Any]
) -> dict[str, Any]:
    met = [row.met for row in rows if row.met is not None]
    loads = ", ".join(f"{k} {v:.1f}" for k, v in raw["loadavg_1min_after"].items())
    return {
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - T0, 1),
        **git_state(),
        "machine": f"{os.cpu_count()} CPUs; {page_reporting()}; 1-min load average at start "
        f"and after each phase: {loads}",
        "targets met": f"{sum(met)} of {len(met)}",
        "medians of": f"{args.warm_runs} warm GETs, {args.runs} wrk runs of {args.wrk_seconds} s "
        f"(-t2 -c32), {args.runs} cold runs, {args.runs} docker pulls",
        "notes": [*NOTES, *upstream_notes(raw)],
    }


def write_results(out: Path, info: dict[str, Any], rows: list[Row], raw: dict[str, Any]) -> None:
    write_json(out / "results.json", info, rows, raw)
    write_markdown(out / "results.md", info, rows)
    problem = write_chart(out / "chart.png", rows, raw.get("rss_samples", []))
    if problem:
        log(f"no chart.png: {problem}")


def save_logs(workdir: Path, dest: Path, lines: int = 300) -> None:
    """The tail of every service log, for a look after the work dir is gone."""
    for path in workdir.glob("*/*.log"):
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / f"{path.parent.name}-{path.name}"
        target.write_text(log_tail(path, lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_tools() + [t for t in ("nginx", "wrk", "curl") if not shutil.which(t)]
    if missing:
        print(f"bench: missing {', '.join(missing)} (make system-deps)")
        return 2
    started = datetime.now()
    out = args.out / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    workdir = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    try:
        with ExitStack() as es:
            stack = start_stack(es, workdir, args)
            rows, raw = run_phases(stack, args, out)
        info = summary(args, started, rows, raw)
        write_results(out, info, rows, raw)
    finally:
        save_logs(workdir, out / "logs")
        if args.keep:
            log(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(text_table(rows))
    print()
    for key, value in info.items():
        if isinstance(value, list):
            print(f"{key}:" + "".join(f"\n  - {item}" for item in value))
        else:
            print(f"{key}: {value}")
    print(f"results: {out}")
    return 0
