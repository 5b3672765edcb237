"""Soak: many concurrent clients pulling a mixed set of images through a real mirror.

    python -m tests.soak [--clients 200] [--seconds 60]

    clients (aiohttp, this process) -> mirror process (+ redis-server)
        -> fake Docker Hub process -> distribution registry (seeded with tests.images)

Each client loops over the images, pulling the way Docker does: GET /v2/, HEAD the manifest
by tag, GET it by digest (for an index, then the amd64 child), GET every blob and check its
sha256. Any non-2xx answer, broken transfer or digest mismatch is an error. The mirror's
resident memory (its process and children, VmRSS from /proc) is sampled every second.

Prints totals, request latency percentiles and the memory series; exits 1 when any request
failed, else 0. A short tag TTL makes tags revalidate upstream during the run too.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.images import (
    Blob,
    Layer,
    busybox_image,
    file_layer,
    many_layers_image,
    multiarch_index,
    push_image,
    single_image,
)
from tests.procmem import tree_rss
from tests.resilience_helpers import (
    MIB,
    Puller,
    random_bytes,
    write_config,
)
from tests.services import (
    DistributionRegistry,
    FakeHubProcess,
    MirrorProcess,
    RedisServer,
)

# Memory is "flat" when its floor at the end is at most this much above the one after WARMUP.
FLAT_RATIO = 1.2
WARMUP = 10.0
FLOOR_SPAN = 5.0
SAMPLE_INTERVAL = 1.0
SHOWN_ERRORS = 10


def seed_images(registry_url: str) -> list[tuple[str, str]]:
    """Push the soak's images; (repo, tag) of each. The 256 MiB image is left out."""
    oci_layers = [
        Layer(blob, diff_id=blob.digest)
        for blob in (
            Blob.of("application/vnd.oci.image.layer.v1.tar+gzip", random_bytes(300_000, 7)),
            Blob.of("application/vnd.oci.image.layer.v1.tar+gzip", random_bytes(64_000, 8)),
        )
    ]
    images = {
        "library/busybox": busybox_image(),
        "library/multiarch": multiarch_index(),
        "library/layers20": many_layers_image(20),
        "library/extra-small": single_image(
            "extra-small", [file_layer("etc/motd", "soak\n"), file_layer("etc/issue", "x\n")]
        ),
        "soak/oci-random": single_image("oci-random", oci_layers, oci=True),
        "soak/half-mib": single_image(
            "half-mib",
            [
                Layer(blob, diff_id=blob.digest)
                for blob in [Blob.of("application/octet-stream", random_bytes(MIB // 2, 9))]
            ],
        ),
    }
    for repo, image in images.items():
        push_image(registry_url, repo, "latest", image)
    return [(repo, "latest") for repo in images]


@dataclass
class MemorySeries:
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes)

    def floor(self, start: float, stop: float) -> int:
        """The smallest sample taken in [start, stop); the last sample when there is none."""
        window = [rss for when, rss in self.samples if start <= when < stop]
        return min(window) if window else self.samples[-1][1]


async def sample_memory(pid: int, series: MemorySeries, stop: asyncio.Event) -> None:
    started = time.monotonic()
    while not stop.is_set():
        rss = await asyncio.to_thread(tree_rss, pid)
        if rss:
            series.samples.append((time.monotonic() - started, rss))
        try:
            async with asyncio.timeout(SAMPLE_INTERVAL):
                await stop.wait()
        except TimeoutError:
            pass


async def client_loop(
    puller: Puller, images: Sequence[tuple[str, str]], offset: int, deadline: float
) -> None:
    i = offset
    while time.monotonic() < deadline:
        repo, tag = images[i % len(images)]
        await puller.pull(repo, tag)
        i += 1


def report_memory(series: MemorySeries) -> bool:
    """Print the RSS figures; True when memory stayed flat.

    Flat: the floor (minimum) of the last FLOOR_SPAN seconds is at most FLAT_RATIO times
    the floor of the FLOOR_SPAN seconds after WARMUP. Floors, because a leak raises the
    floor while a burst of work only makes a transient peak; the raw series is printed too.
    """
    values = [rss for _, rss in series.samples]
    end = series.samples[-1][0]
    warm = series.floor(WARMUP, WARMUP + FLOOR_SPAN)
    final = series.floor(end - FLOOR_SPAN + 0.01, end + 1)
    first, last = values[0], values[-1]
    at_warmup = next((rss for when, rss in series.samples if when >= WARMUP), last)
    flat = final <= FLAT_RATIO * warm
    mib = 1 / MIB
    print(
        f"mirror RSS (MiB, {len(values)} samples every {SAMPLE_INTERVAL:g} s): "
        f"first {first * mib:.1f}, at {WARMUP:g} s {at_warmup * mib:.1f}, "
        f"min {min(values) * mib:.1f}, max {max(values) * mib:.1f}, last {last * mib:.1f}"
    )
    print(
        f"memory flat: {'yes' if flat else 'NO'} (floor of the last {FLOOR_SPAN:g} s "
        f"{final * mib:.1f} MiB {'<=' if flat else '>'} {FLAT_RATIO} x {warm * mib:.1f} MiB, "
        f"the floor of {WARMUP:g}-{WARMUP + FLOOR_SPAN:g} s; "
        f"last/at-{WARMUP:g}-s ratio {last / at_warmup:.2f})"
    )
    print("RSS series (MiB): " + " ".join(f"{rss * mib:.0f}" for rss in values))
    return flat


def _log_kind(line: str) -> str:
    """A log line without its time, request id, digests and numbers."""
    text = re.sub(r"\[[0-9a-f]{8,}\] ", "", line.split(" ", 2)[-1])
    return re.sub(r"sha256:[0-9a-f]+|\d+", "N", text)[:120]


def report_log(mirror: MirrorProcess) -> None:
    """How many warnings and errors the mirror logged, by kind, and the last few."""
    notable = [
        line
        for line in mirror.log_path.read_text(errors="replace").splitlines()
        if re.search(r" (WARNING|ERROR|CRITICAL) ", line)
    ]
    kinds = Counter(_log_kind(line) for line in notable)
    print(f"mirror log: {len(notable)} warning/error lines")
    for kind, count in kinds.most_common(8):
        print(f"  {count:6d} x {kind}")
    if notable:
        print("  last: " + "\n  last: ".join(notable[-5:]))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def soak(
    mirror: MirrorProcess,
    hub: FakeHubProcess,
    images: list[tuple[str, str]],
    args: argparse.Namespace,
) -> int:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    series = MemorySeries()
    stop = asyncio.Event()
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        # The fake hub's pull limit (100 manifest GETs, like an anonymous Hub user) is not
        # what a soak measures: lift it unless asked to keep one.
        knobs = {"ratelimit_remaining": args.hub_ratelimit}
        async with session.post(f"{hub.registry_url}/_knobs", json=knobs) as resp:
            resp.raise_for_status()
        pullers = [Puller(session, mirror.url) for _ in range(args.clients)]
        sampler = asyncio.create_task(sample_memory(mirror.pid, series, stop))
        started = time.monotonic()
        deadline = started + args.seconds
        await asyncio.gather(*(client_loop(p, images, n, deadline) for n, p in enumerate(pullers)))
        elapsed = time.monotonic() - started
        stop.set()
        await sampler

    pulls = sum(p.pulls for p in pullers)
    requests = sum(p.requests for p in pullers)
    errors = [error for p in pullers for error in p.errors]
    latencies = [lat for p in pullers for lat in p.latencies]

    print(f"\n== soak: {args.clients} clients, {elapsed:.1f} s, images: "
          + ", ".join(repo for repo, _ in images))  # fmt: skip
    print(f"pulls completed: {pulls} ({pulls / elapsed:.1f}/s)")
    print(f"requests:        {requests} ({requests / elapsed:.0f}/s)")
    print(f"errors:          {len(errors)}")
    for error in errors[:SHOWN_ERRORS]:
        print(f"   {error}")
    if latencies:
        print(
            f"latency:         p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms, mean {statistics.fmean(latencies) * 1000:.1f} ms"
        )
    if series.samples:
        report_memory(series)
    stats = await asyncio.to_thread(hub.stats)
    print(
        "upstream (fake hub) requests: "
        + ", ".join(
            f"{key} {stats[key]}"
            for key in ("token", "manifest_head", "manifest_get", "blob_get", "cdn_get")
        )
    )
    report_log(mirror)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tag-ttl", default="10s", help="mirror cache.tag_ttl (default 10s)")
    parser.add_argument("--log-level", default="info", help="mirror log.level (default info)")
    parser.add_argument(
        "--hub-ratelimit",
        type=int,
        default=10**9,
        help="manifest GETs the fake hub allows before answering 429 (default: no limit)",
    )
    parser.add_argument("--workdir", help="keep everything here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("docker-registry", "redis-server") if not shutil.which(tool)]
    if missing:
        print(f"soak: missing {', '.join(missing)} (make system-deps)", file=sys.stderr)
        return 2

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mirror-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with (
            DistributionRegistry(workdir / "registry") as registry,
            RedisServer(workdir / "redis") as redis,
        ):
            print(f"seeding {registry.url} ...", flush=True)
            images = seed_images(registry.url)
            with FakeHubProcess(registry.url, workdir=workdir / "fakehub") as hub:
                config = write_config(
                    workdir / "mirror.yml",
                    {"cache": {"tag_ttl": args.tag_ttl}, "log": {"level": args.log_level}},
                )
                with MirrorProcess(
                    workdir / "mirror",
                    hub.registry_url,
                    redis.url,
                    extra_args=["--config", str(config)],
                ) as mirror:
                    print(f"mirror {mirror.url} (pid {mirror.pid}), {args.clients} clients "
                          f"for {args.seconds:g} s ...", flush=True)  # fmt: skip
                    return asyncio.run(soak(mirror, hub, images, args))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
