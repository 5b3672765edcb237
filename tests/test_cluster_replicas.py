"""Replicas as real processes: tags and manifests once across all, tokens, Redis lost.

    clients (aiohttp) -> 2-3 mirror processes (cluster:, one Redis) -> fake hub -> distribution

With the filesystem backend the replicas share one storage directory, as they would share
a bucket; each still has its own process memory. The last test runs them on the S3 backend
(Ceph RGW): one bucket, a local tier each. The fake hub answers manifests slowly
(`manifest_delay`), so that concurrent misses on different replicas overlap for sure.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest

from mirror.cluster.lease import DOWN_RETRY
from tests.cluster_helpers import cluster_section, set_knobs
from tests.loadbalancer import HAProxy
from tests.redis_topologies import TOPOLOGIES, flushed_redis_url
from tests.resilience_helpers import (
    MANIFEST_ACCEPT,
    RandomImage,
    metric_value,
    seed_random_image,
    write_config,
)
from tests.rgw import CephRGW
from tests.services import DistributionRegistry, FakeHubProcess, MirrorProcess, RedisServer

pytestmark = pytest.mark.e2e

TAG_TTL = 1.0
LEASE_TTL = 1.0
SLOW_MANIFEST = 0.5  # seconds the fake hub takes per manifest request
ACCEPT = {"Accept": MANIFEST_ACCEPT}


class Content:
    def __init__(self, registry: DistributionRegistry) -> None:
        self.small = seed_random_image(registry.url, "small", 64 * 1024, seed=61)
        self.other = seed_random_image(registry.url, "other", 64 * 1024, seed=62)
        self.third = seed_random_image(registry.url, "third", 64 * 1024, seed=63)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    with DistributionRegistry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


@pytest.fixture(scope="module")
def content(registry: DistributionRegistry) -> Content:
    return Content(registry)


@pytest.fixture
def hub(
    tmp_path: Path, registry: DistributionRegistry, content: Content
) -> Iterator[FakeHubProcess]:
    with FakeHubProcess(registry.url, workdir=tmp_path / "fakehub") as hub:
        set_knobs(hub, manifest_delay=SLOW_MANIFEST)
        yield hub


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


def start_replicas(
    stack: ExitStack,
    tmp_path: Path,
    hub: FakeHubProcess,
    redis_url: str,
    count: int = 3,
    *,
    shared_storage: bool = True,
    extra: dict[str, Any] | None = None,
) -> list[MirrorProcess]:
    """`count` mirror processes of one cluster on one Redis, started and ready."""
    replicas = []
    for index in range(count):
        workdir = tmp_path / f"replica{index}"
        replica = MirrorProcess(workdir, hub.registry_url)
        config = {
            "redis": {"url": redis_url},
            "cluster": cluster_section(tmp_path, replica, index, LEASE_TTL),
            "cache": {"tag_ttl": f"{TAG_TTL}s"},
            **(extra or {}),
        }
        path = write_config(workdir / "mirror.yaml", config)
        args = ["--config", str(path)]
        if shared_storage:  # given last, it wins over the process's own --storage
            args += ["--storage", str(tmp_path / "shared-storage")]
        replica.extra_args = tuple(args)
        replicas.append(stack.enter_context(replica))
    return replicas


async def manifest(
    session: aiohttp.ClientSession, replica: MirrorProcess, repo: str, reference: str
) -> tuple[int, str, bytes]:
    url = f"{replica.url}/v2/{repo}/manifests/{reference}"
    async with session.get(url, headers=ACCEPT) as resp:
        return resp.status, resp.headers.get("Docker-Content-Digest", ""), await resp.read()


async def spread(
    session: aiohttp.ClientSession,
    replicas: Sequence[MirrorProcess],
    repo: str,
    reference: str,
    count: int,
) -> list[tuple[int, str, bytes]]:
    """`count` concurrent GETs of one manifest, sent to the replicas in turn."""
    return await asyncio.gather(
        *(manifest(session, replicas[i % len(replicas)], repo, reference) for i in range(count))
    )


def assert_all_right(answers: list[tuple[int, str, bytes]], image: RandomImage) -> None:
    for status, digest, body in answers:
        assert status == 200, body[:300]
        assert digest == image.manifest_digest
        assert "sha256:" + hashlib.sha256(body).hexdigest() == image.manifest_digest


async def cluster_metric(
    session: aiohttp.ClientSession, replicas: Sequence[MirrorProcess], name: str
) -> float:
    """mirror_cluster_<name>_total, summed over the tag and manifest kinds and replicas."""
    total = 0.0
    for replica in replicas:
        async with session.get(f"{replica.url}/metrics") as resp:
            text = await resp.text()
        for kind in ("tag", "manifest"):
            found = metric_value(text, f"mirror_cluster_{name}_total", {"kind": kind})
            total += found or 0.0
    return total


# --- one upstream request across replicas ------------------------------------------------


async def test_concurrent_misses_of_a_tag_on_three_replicas_make_one_upstream_get(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    content: Content,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    replicas = start_replicas(stack, tmp_path, hub, flushed_redis_url(request, "single"))
    answers = await spread(session, replicas, content.small.repo, "latest", 12)
    assert_all_right(answers, content.small)
    stats = hub.stats()
    # The tag's HEAD (no pull spent), then its digest's GET.
    assert (stats["manifest_get"], stats["manifest_head"]) == (1, 1)
    # The two other replicas followed the lease holder's result.
    assert await cluster_metric(session, replicas, "lease_waits") == 2


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_an_expired_tag_on_every_replica_at_once_costs_one_upstream_head(
    request: pytest.FixtureRequest,
    topology: str,
    tmp_path: Path,
    hub: FakeHubProcess,
    content: Content,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    replicas = start_replicas(stack, tmp_path, hub, flushed_redis_url(request, topology))
    assert_all_right(
        await spread(session, replicas, content.small.repo, "latest", 3), content.small
    )
    await asyncio.sleep(TAG_TTL + 0.2)  # the tag record expires (on every replica)
    hub.reset()
    answers = await spread(session, replicas, content.small.repo, "latest", 9)
    assert_all_right(answers, content.small)
    stats = hub.stats()
    assert (stats["manifest_head"], stats["manifest_get"]) == (1, 0)


async def test_concurrent_misses_of_a_missing_tag_on_three_replicas_ask_once(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    content: Content,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    replicas = start_replicas(stack, tmp_path, hub, flushed_redis_url(request, "single"))
    answers = await spread(session, replicas, content.small.repo, "no-such-tag", 9)
    assert [status for status, _, _ in answers] == [404] * 9
    for _, _, body in answers:
        assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert (hub.stats()["manifest_head"], hub.stats()["manifest_get"]) == (1, 0)


async def test_an_expired_tag_with_the_upstream_down_costs_one_attempt_and_is_served_stale(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    content: Content,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    replicas = start_replicas(stack, tmp_path, hub, flushed_redis_url(request, "single"))
    image = content.small
    assert_all_right(await spread(session, replicas, image.repo, "latest", 3), image)
    await asyncio.sleep(TAG_TTL + 0.2)
    set_knobs(hub, registry_status=503)  # each manifest request fails after SLOW_MANIFEST
    hub.reset()
    url = f"/v2/{image.repo}/manifests/latest"
    responses = await asyncio.gather(
        *(session.get(f"{replicas[i % 3].url}{url}", headers=ACCEPT) for i in range(9))
    )
    for resp in responses:
        assert resp.status == 200
        assert resp.headers.get("Warning", "").startswith("110")  # stale
        assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
        resp.release()
    # The holder's failure is its waiters': no replica asked the failing upstream again.
    asked = [path for _, _, path in hub.stats()["requests"] if "/manifests/" in path]
    assert len(asked) == 1


async def test_concurrent_misses_by_digest_on_three_replicas_make_one_upstream_get(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    content: Content,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    replicas = start_replicas(stack, tmp_path, hub, flushed_redis_url(request, "single"))
    image = content.other
    answers = await spread(session, replicas, image.repo, image.manifest_digest, 9)
    assert_all_right(answers, image)
    assert hub.stats()["manifest_get"] == 1


async def test_a_replica_killed_while_it_holds_a_tag_lease_is_taken_over(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    content: Content,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    a, b = start_replicas(stack, tmp_path, hub, flushed_redis_url(request, "single"), 2)
    set_knobs(hub, manifest_delay=3.0)  # a's request is still upstream when a dies
    doomed = asyncio.create_task(manifest(session, a, content.third.repo, "latest"))
    while hub.stats()["manifest_get"] == 0:
        await asyncio.sleep(0.05)
    waiter = asyncio.create_task(manifest(session, b, content.third.repo, "latest"))
    await asyncio.sleep(0.3)  # b finds a's lease and waits for its result
    assert not waiter.done()
    assert a.proc is not None
    a.proc.kill()  # SIGKILL: no release, no renewal
    set_knobs(hub, manifest_delay=0)
    assert_all_right([await waiter], content.third)
    with pytest.raises(aiohttp.ClientError):
        await doomed
    assert hub.stats()["manifest_get"] == 2
    assert await cluster_metric(session, [b], "lease_takeovers") == 1


# --- client auth across replicas ---------------------------------------------------------


def _htpasswd(path: Path, users: dict[str, str]) -> Path:
    lines = [
        f"{name}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}"
        for name, password in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def _token(
    session: aiohttp.ClientSession, replica: MirrorProcess, user: str, password: str, repo: str
) -> tuple[int, str]:
    url = f"{replica.url}/token?service=mirror&scope=repository:{repo}:pull"
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    async with session.get(url, headers={"Authorization": f"Basic {basic}"}) as resp:
        body = await resp.json() if resp.status == 200 else {}
        return resp.status, str(body.get("token", ""))


async def test_a_token_issued_by_one_replica_is_accepted_by_the_other(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    content: Content,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    htpasswd = _htpasswd(tmp_path / "htpasswd", {"alice": "wonderland"})
    # Each replica its own disk: no signing key file could be shared by accident.
    a, b = start_replicas(
        stack,
        tmp_path,
        hub,
        flushed_redis_url(request, "single"),
        2,
        shared_storage=False,
        extra={"auth": {"htpasswd": str(htpasswd)}},
    )
    repo = content.small.repo
    status, token = await _token(session, a, "alice", "wonderland", repo)
    assert status == 200 and token
    url = f"{b.url}/v2/{repo}/manifests/latest"
    async with session.get(url, headers={**ACCEPT, "Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200, await resp.text()
    async with session.get(url, headers=ACCEPT) as resp:
        assert resp.status == 401  # and b does ask for one
    assert not (tmp_path / "replica0" / "data" / "auth" / "signing.key").exists()


async def test_an_htpasswd_change_is_picked_up_by_every_replica(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    content: Content,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    htpasswd = _htpasswd(tmp_path / "htpasswd", {"alice": "wonderland"})
    replicas = start_replicas(
        stack,
        tmp_path,
        hub,
        flushed_redis_url(request, "single"),
        2,
        extra={"auth": {"htpasswd": str(htpasswd)}},
    )
    repo = content.small.repo
    for replica in replicas:
        assert (await _token(session, replica, "alice", "wonderland", repo))[0] == 200
        assert (await _token(session, replica, "bob", "builder", repo))[0] == 401
    _htpasswd(htpasswd, {"bob": "builder"})  # alice leaves, bob arrives
    deadline = time.monotonic() + 30  # each replica re-reads the file every 10 s
    pending = list(replicas)
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        answers = [await _token(session, r, "bob", "builder", repo) for r in pending]
        pending = [r for r, (status, _) in zip(pending, answers, strict=True) if status != 200]
    assert not pending, "a replica never saw bob"
    for replica in replicas:
        assert (await _token(session, replica, "alice", "wonderland", repo))[0] == 401


def _answered(metrics: str, route: str) -> float:
    """Requests of `route` a replica answered 200, from its /metrics text."""
    labels = {"route": route, "method": "GET", "status": "200"}
    return metric_value(metrics, "mirror_http_requests_total", labels) or 0.0


@pytest.mark.skipif(shutil.which("skopeo") is None or shutil.which("haproxy") is None,
                    reason="skopeo and haproxy are installed by make test")  # fmt: skip
async def test_skopeo_logs_in_and_copies_through_a_round_robin_balancer(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    content: Content,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    """The token comes from one replica, the next request goes to the other."""
    htpasswd = _htpasswd(tmp_path / "htpasswd", {"alice": "wonderland"})
    replicas = start_replicas(
        stack,
        tmp_path,
        hub,
        flushed_redis_url(request, "single"),
        2,
        shared_storage=False,
        extra={"auth": {"htpasswd": str(htpasswd)}},
    )
    balancer = stack.enter_context(HAProxy(tmp_path / "lb", [r.url for r in replicas]))
    home = tmp_path / "skopeo-home"
    (home / "run").mkdir(parents=True)
    (home / "registries.conf").write_text("")
    env = {
        "HOME": str(home),
        "PATH": os.environ["PATH"],
        "XDG_RUNTIME_DIR": str(home / "run"),
        "REGISTRY_AUTH_FILE": str(home / "auth.json"),
        "CONTAINERS_REGISTRIES_CONF": str(home / "registries.conf"),
        "DOCKER_CONFIG": str(home / "docker"),
    }
    image = content.small
    target = tmp_path / "copied"
    source = f"docker://127.0.0.1:{balancer.port}/{image.repo}:latest"
    done = await asyncio.to_thread(
        subprocess.run,
        ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
         "--src-creds", "alice:wonderland", source, f"dir:{target}"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (target / image.layer_digest.split(":")[1]).read_bytes() == image.data
    tokens, served = [], []
    for replica in replicas:
        async with session.get(f"{replica.url}/metrics") as resp:
            text = await resp.text()
        tokens.append(_answered(text, "token"))
        served.append(_answered(text, "manifest") + _answered(text, "blob"))
    # Each replica answered token-bearing requests; one token would have done for both.
    assert all(served), (tokens, served)


# --- Redis lost and back ------------------------------------------------------------------


async def _blob_ok(
    session: aiohttp.ClientSession, replica: MirrorProcess, image: RandomImage
) -> bool:
    async with session.get(f"{replica.url}{image.blob_path}") as resp:
        return resp.status == 200 and await resp.read() == image.data


async def _until_ready(session: aiohttp.ClientSession, replica: MirrorProcess) -> None:
    """Until /readyz finds Redis again (which also ends the metadata store's backoff)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with session.get(f"{replica.url}/readyz") as resp:
            if resp.status == 200:
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{replica.url} never found Redis again")


async def test_redis_lost_each_replica_works_alone_and_recovers_by_itself(
    tmp_path: Path,
    hub: FakeHubProcess,
    content: Content,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    redis = stack.enter_context(RedisServer(tmp_path / "redis"))
    replicas = start_replicas(stack, tmp_path, hub, redis.url)
    small = content.small
    assert_all_right(await spread(session, replicas, small.repo, "latest", 3), small)
    assert await _blob_ok(session, replicas[0], small)

    redis.stop()
    # Every replica still pulls: the tag it knew, a tag it never saw, their blobs.
    for replica in replicas:
        assert_all_right([await manifest(session, replica, small.repo, "latest")], small)
        assert await _blob_ok(session, replica, small)
    answers = await spread(session, replicas, content.other.repo, "latest", 6)
    assert_all_right(answers, content.other)
    for replica in replicas:
        assert await cluster_metric(session, [replica], "lease_unavailable") >= 1
        async with session.get(f"{replica.url}/readyz") as resp:
            assert resp.status == 503

    redis.start()  # same port, empty
    for replica in replicas:
        await _until_ready(session, replica)
    await asyncio.sleep(DOWN_RETRY)  # each replica tries leases again after this
    hub.reset()
    waits = await cluster_metric(session, replicas, "lease_waits")
    answers = await spread(session, replicas, content.third.repo, "latest", 9)
    assert_all_right(answers, content.third)
    assert hub.stats()["manifest_get"] == 1  # one lease across the replicas again
    assert await cluster_metric(session, replicas, "lease_waits") == waits + 2


# --- the S3 backend: one bucket, a local tier per replica ---------------------------------


async def test_replicas_on_one_bucket_fetch_each_manifest_once(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    rgw: CephRGW,
    s3_bucket: str,
    hub: FakeHubProcess,
    content: Content,
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    s3 = {
        "endpoint": rgw.endpoint,
        "bucket": s3_bucket,
        "region": rgw.region,
        "access_key_id": rgw.access_key,
        "secret_access_key": rgw.secret_key,
    }
    replicas = start_replicas(
        stack,
        tmp_path,
        hub,
        flushed_redis_url(request, "single"),
        shared_storage=False,  # waiters read the holder's manifest from the bucket
        extra={"storage": {"s3": s3}},
    )
    small, other = content.small, content.other
    assert_all_right(await spread(session, replicas, small.repo, "latest", 9), small)
    assert_all_right(await spread(session, replicas, other.repo, other.manifest_digest, 9), other)
    stats = hub.stats()
    assert (stats["manifest_get"], stats["manifest_head"]) == (2, 1)  # the tag's HEAD
    keys = rgw.s3().keys(s3_bucket)
    for image in (small, other):
        assert "manifests/" + image.manifest_digest.replace(":", "/") in keys
    # Expired on every replica at once: one HEAD, and no replica needs the bytes again.
    await asyncio.sleep(TAG_TTL + 0.2)
    hub.reset()
    assert_all_right(await spread(session, replicas, small.repo, "latest", 9), small)
    stats = hub.stats()
    assert (stats["manifest_head"], stats["manifest_get"]) == (1, 0)
