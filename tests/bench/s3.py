"""The S3 backend in the bench: a Ceph RGW, two mirrors on one bucket, and their figures.

    mirror-s3           local tier + bucket (the cold runs and the warm GETs)
    mirror-s3-redirect  the same bucket, `redirect: true` (307 to a presigned URL)

Both run the bench's production config (audit, pull policy: mirrorconfig.py). S3 requests
are counted by the server itself (radosgw's `req` perf counter, read through its admin
socket), so "requests per warm GET" does not rest on the mirror's own metrics. The
reference for a GET from the bucket is the same object fetched straight from RGW with curl
(a presigned URL), in the same rounds; the CPU seconds of each process are recorded for both.
"""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.bench.clients import OPENER, BenchError, curl_get
from tests.bench.cpu import CpuMeter, Procs, Used, alone, median_used, tree
from tests.bench.freshwrite import fresh_write
from tests.bench.freshwrite import side as fresh_side
from tests.bench.measure import Cold
from tests.bench.memory import RssSampler
from tests.bench.mirrorconfig import check_production, write_config
from tests.bench.report import MIB, RSS_LIMIT_MIB, Row, limit_row, median, ratio
from tests.bench.seeding import BigBlob
from tests.bench.settle import settle
from tests.rgw import CephRGW, ceph_available
from tests.services import MirrorProcess, RedisServer

Log = Callable[[str], None]
T = TypeVar("T")
PREFIX = "bench/"


@dataclass
class S3Stack:
    rgw: CephRGW
    bucket: str
    mirror: MirrorProcess
    redirect: MirrorProcess
    redis: RedisServer
    rss: list[RssSampler] = field(default_factory=list)  # one per life of `mirror`

    def rgw_procs(self) -> Procs:
        return {name: alone(pid) for name, pid in self.rgw.pids().items()}

    def procs(self) -> Procs:
        """`mirror` (the streaming one), its Redis and the RGW daemons."""
        mirror = {"mirror-s3": tree(self.mirror.pid), "redis": alone(self.redis.pid)}
        return {**mirror, **self.rgw_procs()}

    def restart_empty(self) -> None:
        """`mirror` stopped, its local tier thrown away, started again on the same port."""
        self.rss[-1].stop()
        self.mirror.stop()
        shutil.rmtree(self.mirror.workdir / "data", ignore_errors=True)
        self.mirror.start()
        self.rss.append(RssSampler(self.mirror.pid).start())

    def stop_sampling(self) -> tuple[int, int]:
        self.rss[-1].stop()
        return max(s.max_bytes for s in self.rss), self.rss[-1].final_bytes


def available() -> bool:
    return ceph_available()


def _config(workdir: Path, hub_url: str, rgw: CephRGW, bucket: str, redirect: bool) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    secret = workdir / "s3-secret"
    secret.write_text(rgw.secret_key + "\n")
    s3 = {
        "endpoint": rgw.endpoint,
        "bucket": bucket,
        "region": rgw.region,
        "prefix": PREFIX,
        "path_style": True,
        "access_key_id": rgw.access_key,
        "secret_access_key_file": str(secret),
        "redirect": redirect,
    }
    return write_config(workdir / "mirror.yaml", hub_url, storage={"s3": s3})


def start(es: ExitStack, workdir: Path, hub_url: str, log: Log) -> S3Stack:
    rgw = es.enter_context(CephRGW(workdir / "rgw"))
    # Both mirrors share one Redis, as replicas of one bucket would: the redirecting one
    # then knows from the records which blobs the bucket holds, with no S3 request.
    redis = es.enter_context(RedisServer(workdir / "redis-s3"))
    bucket = rgw.new_bucket_name()
    rgw.s3().create_bucket(bucket)
    mirrors = []
    for name, redirect in (("mirror-s3", False), ("mirror-s3-redirect", True)):
        config = _config(workdir / name, hub_url, rgw, bucket, redirect)
        mirrors.append(
            es.enter_context(
                MirrorProcess(
                    workdir / name, hub_url, redis.url, extra_args=["--config", str(config)]
                )
            )
        )
    for mirror in mirrors:
        check_production(mirror)
    stack = S3Stack(rgw, bucket, mirrors[0], mirrors[1], redis)
    stack.rss.append(RssSampler(stack.mirror.pid).start())
    es.callback(lambda: stack.rss[-1].stop())
    log(f"rgw {rgw.endpoint} bucket {bucket}, mirror-s3 {stack.mirror.url}, "
        f"redirect {stack.redirect.url}")  # fmt: skip
    return stack


# --- the warm measurements ------------------------------------------------------------------


@dataclass
class S3Warm:
    bucket_seconds: list[float] = field(default_factory=list)  # mirror, empty local tier
    direct_seconds: list[float] = field(default_factory=list)  # curl straight from RGW
    local_seconds: list[float] = field(default_factory=list)  # mirror, local tier filled
    nginx_seconds: list[float] = field(default_factory=list)
    redirect_seconds: list[float] = field(default_factory=list)  # curl -L through the 307
    requests: dict[str, list[int]] = field(default_factory=dict)  # S3 requests per GET
    rss_max: int = 0
    rss_final: int = 0
    # CPU seconds per process during each GET from the bucket, and during each direct GET:
    # on 2 cores the mirror, RGW and curl share them, where the direct GET has only RGW and
    # curl.
    bucket_cpu: list[Used] = field(default_factory=list)
    direct_cpu: list[Used] = field(default_factory=list)
    # The blob's size written into a new file, as the empty local tier is (freshwrite.py).
    fresh_seconds: list[float] = field(default_factory=list)
    fresh_cpu: list[Used] = field(default_factory=list)


def _in_bucket(s: S3Stack, blob: BigBlob, timeout: float = 120.0) -> None:
    key = f"{PREFIX}blobs/sha256/{blob.digest.removeprefix('sha256:')}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if key in s.rgw.s3().keys(s.bucket, key):
            return
        time.sleep(0.5)
    raise BenchError(f"{key} did not appear in the bucket")


def _counted(s: S3Stack, get: Callable[[], T]) -> tuple[T, int]:
    """(seconds, S3 requests RGW served meanwhile) for one GET."""
    before = s.rgw.requests()
    seconds = get()
    time.sleep(0.3)  # a request still on its way is counted too
    return seconds, s.rgw.requests() - before


def _redirect_status(url: str) -> tuple[int, str]:
    """The status and Location of a GET, the redirect not followed."""

    class NoFollow(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoFollow)
    try:
        with opener.open(url, timeout=30) as resp:
            return int(resp.status), ""
    except urllib.error.HTTPError as err:
        err.close()
        return int(err.code), err.headers.get("Location", "")


def _metered_get(url: str, size: int, procs: Procs) -> tuple[float, Used]:
    """One GET's seconds and the CPU seconds of procs and curl (not of the `ceph` command
    _counted runs around it)."""
    with CpuMeter(procs, "curl") as cpu:
        seconds = curl_get(url, size).seconds
    return seconds, cpu.used


def warm(s: S3Stack, blob: BigBlob, nginx_url: str, runs: int, log: Log) -> S3Warm:
    """The blob put into the bucket by one cold GET; then per run: a GET from the bucket
    with an empty local tier, one from the filled tier, nginx, RGW direct, the redirect,
    and the blob's size written into a new file."""
    out = S3Warm(requests={"bucket": [], "local": [], "redirect": []})
    url = s.mirror.url + blob.path()
    curl_get(url, blob.size)
    _in_bucket(s, blob)
    key = f"{PREFIX}blobs/sha256/{blob.digest.removeprefix('sha256:')}"
    direct_url = s.rgw.presign(s.bucket, key)
    redirect_url = s.redirect.url + blob.path()
    for run in range(runs):
        s.restart_empty()
        settle()
        (seconds, used), n = _counted(s, lambda: _metered_get(url, blob.size, s.procs()))
        out.bucket_cpu.append(used)
        out.bucket_seconds.append(seconds)
        out.requests["bucket"].append(n)
        time.sleep(1.0)  # the local tier commits after the last byte went out
        seconds, n = _counted(s, lambda: curl_get(url, blob.size).seconds)
        out.local_seconds.append(seconds)
        out.requests["local"].append(n)
        out.nginx_seconds.append(curl_get(nginx_url, blob.size).seconds)
        settle()
        with CpuMeter(s.rgw_procs(), "curl") as cpu:
            out.direct_seconds.append(curl_get(direct_url, blob.size).seconds)
        out.direct_cpu.append(cpu.used)
        (status, location), n = _counted(s, lambda: _redirect_status(redirect_url))
        if status != 307 or not location:
            raise BenchError(f"GET {redirect_url}: {status}, not a 307 with a Location")
        out.requests["redirect"].append(n)
        out.redirect_seconds.append(curl_get(redirect_url, blob.size, follow=True).seconds)
        seconds, used = fresh_write(s.mirror.workdir, blob.size)
        out.fresh_seconds.append(seconds)
        out.fresh_cpu.append(used)
        log(f"  run {run + 1}/{runs}: bucket {out.bucket_seconds[-1]:.2f}s "
            f"({out.requests['bucket'][-1]} S3 req), local {out.local_seconds[-1]:.2f}s "
            f"({out.requests['local'][-1]}), direct S3 {out.direct_seconds[-1]:.2f}s, "
            f"nginx {out.nginx_seconds[-1]:.2f}s, redirect {out.redirect_seconds[-1]:.2f}s "
            f"({out.requests['redirect'][-1]} S3 req before the 307), new file "
            f"{out.fresh_seconds[-1]:.2f}s; CPU s during the bucket GET "
            f"{out.bucket_cpu[-1]}")  # fmt: skip
    return out


def metrics_text(mirror: MirrorProcess) -> str:
    with OPENER.open(mirror.url + "/metrics", timeout=10) as resp:
        return str(resp.read().decode())


# --- rows -----------------------------------------------------------------------------------


def warm_rows(w: S3Warm, size_mib: int) -> list[Row]:
    b, d = median(w.bucket_seconds), median(w.direct_seconds)
    loc, n = median(w.local_seconds), median(w.nginx_seconds)
    r = median(w.redirect_seconds)
    worst = {k: float(max(v)) for k, v in w.requests.items()}
    name = f"S3: warm GET {size_mib} MiB"
    cpu = {"mirror": median_used(w.bucket_cpu), "direct S3 GET": median_used(w.direct_cpu),
           fresh_side(size_mib, median(w.fresh_seconds)): median_used(w.fresh_cpu)}  # fmt: skip
    return [
        Row(f"{name} from the bucket, empty local tier", "s", b, None, d, ratio(b, d), "le",
            1.3, "≤ 1.3× direct S3 GET (curl from RGW)", cpu),
        Row(f"{name} from the local tier", "s", loc, None, n, ratio(loc, n), "le", 1.25,
            "≤ 1.25× nginx"),
        Row(f"{name} via 307 to a presigned URL", "s", r, None, d, ratio(r, d), "le", 1.3,
            "≤ 1.3× direct S3 GET (curl from RGW)"),
        Row("S3: requests per warm GET, local tier (worst)", "req", worst["local"], None, None,
            worst["local"], "eq", 0.0, "0"),
        Row("S3: requests per warm GET, bucket (worst)", "req", worst["bucket"], None, 1.0,
            worst["bucket"], "le", 1.0, "≤ 1 (distribution: ~5)"),
        Row("S3: requests per warm GET, redirect (worst)", "req", worst["redirect"], None,
            None, worst["redirect"], "eq", 0.0, "0"),
    ]  # fmt: skip


def cold_rows(cold: Cold, clients: int) -> list[Row]:
    s3 = [r for r in cold.runs if r.target == "mirror-s3"]
    fs = [r for r in cold.runs if r.target == "mirror"]
    if not s3:
        return []
    fetches = float(max(r.upstream_fetches for r in s3))
    wall_s3, wall_fs = median([r.wall for r in s3]), median([r.wall for r in fs])
    cpu = {"mirror-s3": median_used([r.cpu for r in s3]),
           "filesystem backend": median_used([r.cpu for r in fs])}  # fmt: skip
    return [
        Row(f"S3: cold {clients}× GET: upstream fetches, worst run", "fetches", fetches, None,
            1.0, fetches, "eq", 1.0, "exactly 1"),
        Row(f"S3: cold {clients}× GET: all done", "s", wall_s3, None, wall_fs,
            ratio(wall_s3, wall_fs), "le", 1.3, "≤ 1.3× filesystem backend, same run", cpu),
    ]  # fmt: skip


def memory_rows(max_bytes: int, final_bytes: int) -> list[Row]:
    return [
        limit_row(f"S3: mirror RSS, {name}", "MiB", v / MIB, RSS_LIMIT_MIB,
                  f"< {RSS_LIMIT_MIB} MiB")
        for name, v in (("max", max_bytes), ("final", final_bytes))
    ]  # fmt: skip
