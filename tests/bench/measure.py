"""The five measurements. Each takes the running stack and returns plain, JSON-able results.

Targets are interleaved within a phase (mirror, peer, nginx, mirror, …) so that a slow
moment of the machine falls on all of them rather than on one.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.clients import (
    ACCEPT,
    OPENER,
    BenchError,
    WrkResult,
    curl_get,
    curl_together,
    hub_token,
    wrk,
    wrk_script,
)
from tests.bench.cpu import CpuMeter, Procs, Used
from tests.bench.freshwrite import fresh_write
from tests.bench.loadgen import loadgen
from tests.bench.seeding import BigBlob
from tests.bench.settle import settle
from tests.services import DockerDaemon, FakeHubProcess

Log = Callable[[str], None]


@dataclass
class WarmBlob:
    seconds: dict[str, list[float]]  # "mirror" / "peer" / "nginx" -> one entry per GET
    warming_gets: dict[str, int]  # GETs it took until one caused no upstream fetch
    upstream_fetches: int  # CDN GETs of the blob during the timed GETs: 0 when warm
    cpu: dict[str, list[Used]]  # the same names -> per GET, CPU seconds by process


def cdn_fetches(hub: FakeHubProcess, digest: str) -> int:
    return int(hub.stats()["cdn_get_by_digest"].get(digest, 0))


def warm_up(url: str, blob: BigBlob, hub: FakeHubProcess, tries: int = 5) -> int:
    """GET until a GET is served without the upstream (a cache may commit after the
    response ends: the peer verifies the blob first); how many GETs that took."""
    for attempt in range(1, tries + 1):
        hub.reset()
        curl_get(url, blob.size)
        time.sleep(0.5)
        if attempt > 1 and cdn_fetches(hub, blob.digest) == 0:
            return attempt
    raise BenchError(f"{url} still fetches from the upstream after {tries} GETs")


def warm_blob(
    urls: dict[str, tuple[str, Procs]], blob: BigBlob, hub: FakeHubProcess, runs: int
) -> WarmBlob:
    """Timed GETs of one cached blob, after untimed ones that fill each cache.

    `urls`: "mirror" / "peer" / "nginx" -> (the blob's URL there, the server's processes)."""
    warming = {name: warm_up(urls[name][0], blob, hub) for name in ("mirror", "peer")}
    hub.reset()
    seconds: dict[str, list[float]] = {name: [] for name in urls}
    used: dict[str, list[Used]] = {name: [] for name in urls}
    for _ in range(runs):
        for name, (url, procs) in urls.items():
            settle()
            with CpuMeter(procs, "curl") as cpu:
                seconds[name].append(curl_get(url, blob.size).seconds)
            used[name].append(cpu.used)
    return WarmBlob(seconds, warming, cdn_fetches(hub, blob.digest), used)


# --- manifests ------------------------------------------------------------------------------


@dataclass
class ManifestRuns:
    results: dict[str, list[WrkResult]] = field(default_factory=dict)  # label -> runs
    cpu: dict[str, list[Used]] = field(default_factory=dict)  # label -> per run, by process
    # Manifest requests (GET + HEAD) the upstream saw during each run.
    upstream: dict[str, list[int]] = field(default_factory=dict)


def manifest_digest(url: str) -> str:
    """GET a manifest by tag (filling the cache); the digest it answered with."""
    return manifest_answer(url)[0]


def manifest_answer(url: str) -> tuple[str, bytes]:
    """GET a manifest by tag (filling the cache); its digest and bytes."""
    request = urllib.request.Request(url, headers={"Accept": ACCEPT})
    with OPENER.open(request, timeout=30) as resp:
        body: bytes = resp.read()
        digest: str | None = resp.headers.get("Docker-Content-Digest")
    if not digest:
        raise BenchError(f"GET {url}: no Docker-Content-Digest")
    return digest, body


@dataclass(frozen=True)
class Target:
    tool: str  # "wrk", or "loadgen" where wrk cannot go (HEAD)
    method: str
    url: str
    procs: Procs  # the servers whose CPU time counts (the client's is counted anyway)


# wrk cannot HEAD (see tests.bench.loadgen): HEAD is measured with loadgen, and so is GET by
# tag once more, so that HEAD is compared with GET as measured by the same client.
LOADGEN_GET, LOADGEN_HEAD = "mirror GET tag, loadgen", "mirror HEAD tag, loadgen"
# The same answer without the mirror: a file from nginx (1 worker), and aiohttp alone.
NGINX_FILE, FRAMEWORK = "nginx GET the manifest file", "aiohttp alone GET tag"


def manifest_targets(
    mirror: tuple[str, Procs],
    peer: tuple[str, Procs],
    repo: str,
    floors: dict[str, tuple[str, Procs]] | None = None,
) -> dict[str, Target]:
    """label -> what to load, each warmed by one GET first; (base URL, processes) each.
    `floors`: NGINX_FILE and FRAMEWORK, by their full URLs."""
    (mirror_url, mine), (peer_url, peers) = mirror, peer
    tag_path = f"/v2/{repo}/manifests/latest"
    digest = manifest_digest(mirror_url + tag_path)
    manifest_digest(peer_url + tag_path)
    by_digest = f"{mirror_url}/v2/{repo}/manifests/{digest}"
    targets = {
        "mirror GET tag": Target("wrk", "GET", mirror_url + tag_path, mine),
        "mirror GET digest": Target("wrk", "GET", by_digest, mine),
        "peer GET tag": Target("wrk", "GET", peer_url + tag_path, peers),
        LOADGEN_GET: Target("loadgen", "GET", mirror_url + tag_path, mine),
        LOADGEN_HEAD: Target("loadgen", "HEAD", mirror_url + tag_path, mine),
    }
    for label, (url, procs) in (floors or {}).items():
        targets[label] = Target("wrk", "GET", url, procs)
    return targets


def load(target: Target, scripts: dict[str, Path], seconds: int) -> WrkResult:
    if target.tool == "wrk":
        return wrk(target.url, scripts[target.method], seconds)
    return loadgen(target.url, target.method, [f"Accept: {ACCEPT}"], seconds)


def manifests(
    targets: dict[str, Target],
    hub: FakeHubProcess,
    workdir: Path,
    runs: int,
    seconds: int,
    log: Log,
) -> ManifestRuns:
    """Each target in turn, `runs` rounds; the upstream's manifest requests counted per run."""
    out = ManifestRuns()
    scripts = {method: wrk_script(workdir, method) for method in ("GET", "HEAD")}
    for run in range(runs):
        for label, target in targets.items():
            time.sleep(1)  # the previous target's last upstream requests land before the reset
            hub.reset()
            with CpuMeter(target.procs, target.tool) as cpu:
                result = load(target, scripts, seconds)
            stats = hub.stats()
            out.results.setdefault(label, []).append(result)
            out.cpu.setdefault(label, []).append(cpu.used)
            out.upstream.setdefault(label, []).append(
                int(stats["manifest_get"]) + int(stats["manifest_head"])
            )
            log(
                f"  run {run + 1}/{runs} {label}: {result.rps:,.0f} req/s, "
                f"p99 {result.p99_ms:.1f} ms, {result.errors} errors, CPU s {cpu.used}"
            )
    return out


# --- cold blobs -----------------------------------------------------------------------------


@dataclass
class ColdRun:
    target: str
    digest: str
    wall: float  # from starting the clients until the last one finished
    upstream_fetches: int  # CDN GETs of this digest
    client_seconds: list[float]
    cpu: Used  # by process, during the GETs


@dataclass
class Cold:
    direct: list[float] = field(default_factory=list)  # one client straight from the upstream
    runs: list[ColdRun] = field(default_factory=list)
    direct_cpu: list[Used] = field(default_factory=list)  # by process, per direct fetch
    fresh: list[float] = field(default_factory=list)  # the blob's size into a new file
    fresh_cpu: list[Used] = field(default_factory=list)  # dd's CPU seconds, per write


def direct_fetch(hub: FakeHubProcess, blob: BigBlob) -> float:
    """One GET from the fake hub itself: token, registry, 307, CDN (the token stays home).

    What every cold figure is held to: the upstream's share of the time, which no mirror
    can go below."""
    token = hub_token(hub.urls["token"], blob.repo)
    auth = (f"Authorization: Bearer {token}",)
    return curl_get(hub.registry_url + blob.path(), blob.size, auth, follow=True).seconds


def metered_direct_fetch(hub: FakeHubProcess, blob: BigBlob, upstream: Procs) -> tuple[float, Used]:
    """direct_fetch, with the CPU seconds of the upstream's processes and of curl."""
    settle()
    with CpuMeter(upstream, "curl") as cpu:
        seconds = direct_fetch(hub, blob)
    return seconds, cpu.used


def cold_run(
    target: tuple[str, str, Procs], blob: BigBlob, hub: FakeHubProcess, clients: int
) -> ColdRun:
    """`clients` concurrent GETs of blob from (name, base URL, processes)."""
    name, base_url, procs = target
    settle()
    hub.reset()
    with CpuMeter(procs, "curl") as cpu:
        wall, fetches = curl_together(base_url + blob.path(), blob.size, clients)
    time.sleep(0.5)  # a straggling upstream fetch should still be counted
    count = hub.stats()["cdn_get_by_digest"].get(blob.digest, 0)
    return ColdRun(name, blob.digest, wall, int(count), [f.seconds for f in fetches], cpu.used)


def cold(
    bases: dict[str, tuple[str, Procs]],
    fresh: list[BigBlob],
    direct: tuple[BigBlob, Procs],
    hub: FakeHubProcess,
    clients: int,
    log: Log,
    scratch: Path,
) -> Cold:
    """Direct fetches, then per run `clients` concurrent GETs of a blob no target has seen,
    and after them the blob's size written into a new file in `scratch` (freshwrite.py).

    `bases`: name -> (base URL, its processes); `direct`: the blob fetched straight from
    the upstream, and the upstream's processes. The mirror and the peer have separate
    caches, so a run's blob is fresh to both; the upstream's counters are reset before each
    target.
    """
    out = Cold()
    for _ in fresh:
        seconds, used = metered_direct_fetch(hub, *direct)
        out.direct.append(seconds)
        out.direct_cpu.append(used)
    log(f"  direct fetch: {', '.join(f'{s:.2f}s' for s in out.direct)}")
    for run, blob in enumerate(fresh):
        for target, (base, procs) in bases.items():
            result = cold_run((target, base, procs), blob, hub, clients)
            out.runs.append(result)
            log(
                f"  run {run + 1} {target}: {result.wall:.2f}s, "
                f"{result.upstream_fetches} upstream fetches, CPU s {result.cpu}"
            )
        seconds, used = fresh_write(scratch, blob.size)
        out.fresh.append(seconds)
        out.fresh_cpu.append(used)
        log(f"  run {run + 1} {blob.size // (1 << 20)} MiB into a new file: {seconds:.2f}s, {used}")
    return out


# --- docker pull ----------------------------------------------------------------------------

PULL_STATS = ("cdn_get", "manifest_get", "manifest_head")


def timed_pull(docker: DockerDaemon, name: str, digest: str) -> float:
    start = time.monotonic()
    done = docker.docker("pull", name, check=False, timeout=600)
    seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    if done.returncode != 0 or f"Digest: {digest}" not in output:
        raise BenchError(f"docker pull {name} (expected {digest}):\n{output}")
    return seconds


def remove_image(docker: DockerDaemon, name: str) -> None:
    docker.docker("rmi", name)
    left = docker.docker("images", "-q").stdout.split()
    if left:
        raise BenchError(f"docker rmi {name} left images behind: {left}")


@dataclass
class DockerPulls:
    seconds: dict[str, list[float]] = field(default_factory=dict)  # target -> timed pulls
    # What each timed pull cost the upstream: CDN GETs (0 when warm), manifest requests.
    upstream: dict[str, list[dict[str, int]]] = field(default_factory=dict)


def docker_pulls(
    mirrors: dict[str, str],
    hub: FakeHubProcess,
    workdir: Path,
    image: tuple[str, str],
    runs: int,
    log: Log,
) -> DockerPulls:
    """A private dockerd per registry mirror pulls once to warm it; then timed pulls, in turn."""
    name, digest = image
    out = DockerPulls({t: [] for t in mirrors}, {t: [] for t in mirrors})
    with ExitStack() as stack:
        daemons = {
            target: stack.enter_context(DockerDaemon(workdir / f"docker-{target}", url))
            for target, url in mirrors.items()
        }
        for docker in daemons.values():
            timed_pull(docker, name, digest)  # fills the mirror's (or the peer's) cache
            remove_image(docker, name)
        time.sleep(1)  # let the peer commit what it streamed
        for run in range(runs):
            for target, docker in daemons.items():
                hub.reset()
                out.seconds[target].append(timed_pull(docker, name, digest))
                stats = hub.stats()
                out.upstream[target].append({key: int(stats[key]) for key in PULL_STATS})
                remove_image(docker, name)
                log(f"  run {run + 1}/{runs} {target}: {out.seconds[target][-1]:.2f}s, "
                    f"upstream {out.upstream[target][-1]}")  # fmt: skip
    return out
