"""Redis as one server, with Sentinel and as a Cluster: the URL forms, a mirror serving pulls
on each, a Sentinel failover during pulls, and Redis lost entirely and back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mirror.config import CacheConfig, Config, ConfigError, RedisConfig, apply_overrides
from mirror.config.redis import parse_redis_url, redacted
from mirror.metadata.fallback import FallbackMetadata, open_metadata
from mirror.metadata.store import TagRecord
from mirror.web.keys import metadata_key
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.redis_topologies import (
    MASTER_NAME,
    TOPOLOGIES,
    RedisClusterSetup,
    RedisSentinelSetup,
    flushed_redis_url,
    redis_command,
    require_redis_tools,
)
from tests.services import free_port
from tests.test_config import config_error, run_cli, write

Client = TestClient[Any, Any]
ACCEPT = {
    "Accept": "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.oci.image.index.v1+json"
}
SECRET = "s3cr3t-pa55"
# How long the fallback may take to find Redis again: its backoff doubles from 1 s (1, 2, 4,
# 8, 16 s between tries), so a return within this is seen; a fallback that never retries fails.
RECOVERY_BOUND = 45.0


# --- the URL forms ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "topology", "nodes", "master", "db"),
    [
        ("redis://127.0.0.1:6379/2", "server", (), "", 2),
        ("rediss://cache.example:6380", "server", (), "", 0),
        ("unix:///run/redis.sock?db=3", "server", (), "", 3),
        (
            "redis+sentinel://s1:26379,s2:26380/mymaster",
            "sentinel",
            (("s1", 26379), ("s2", 26380)),
            "mymaster",
            0,
        ),
        ("redis+sentinel://s1,[::1]:5000/m/4", "sentinel", (("s1", 26379), ("::1", 5000)), "m", 4),
        (
            "redis+cluster://h1:7000,h2:7001,h3:7002",
            "cluster",
            (("h1", 7000), ("h2", 7001), ("h3", 7002)),
            "",
            0,
        ),
        ("redis+cluster://h1/0", "cluster", (("h1", 6379),), "", 0),
    ],
)
async def test_url_forms(
    url: str, topology: str, nodes: tuple[tuple[str, int], ...], master: str, db: int
) -> None:
    target = parse_redis_url("redis.url", url)
    assert (target.topology, target.nodes, target.master, target.db) == (
        topology,
        nodes,
        master,
        db,
    )


async def test_credentials_of_the_replicated_forms() -> None:
    target = parse_redis_url("redis.url", f"redis+sentinel://app:{SECRET}@s1:26379/m")
    assert (target.username, target.password) == ("app", SECRET)
    target = parse_redis_url("redis.url", f"redis+cluster://:{SECRET}@h1:7000")
    assert (target.username, target.password) == (None, SECRET)
    assert SECRET not in repr(target)


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:6379",
        "redis+sentinel://s1:26379",  # no master name
        "redis+sentinel://s1:26379/m/x",  # db not a number
        "redis+sentinel://s1:26379/m/\u00b2",  # "²": isdigit() says yes, int() no
        "redis+cluster://h1:" + "9" * 5000,  # more digits than int() converts
        "redis+sentinel://s1:26379/m/0/extra",
        "redis+sentinel://s1:notaport/m",
        "redis+sentinel://s1:26379,,s2/m",  # an empty host
        "redis+sentinel:///m",  # no host at all
        "redis+cluster://h1:7000,h2:99999",  # port out of range
        "redis+cluster://h1:7000/3",  # a cluster has database 0 only
        "redis+cluster://h1:7000?timeout=1",
        "redis://h1:6379/notadb",
        "redis://h1:port/0",
        "redis+sentinel-ish://s1/m",
    ],
)
async def test_bad_url_forms_name_redis_url(url: str) -> None:
    err = config_error({"redis": {"url": url}})
    assert err.key == "redis.url"


@pytest.mark.parametrize(
    "url",
    [
        f"redis+sentinel://app:{SECRET}@s1:26379",
        f"redis+cluster://app:{SECRET}@h1:7000/5",
        f"redis://app:{SECRET}@h1:port/0",
        f"redis://:{SECRET}@h1:6379/nodb",
        f"http://app:{SECRET}@h1:6379",
        # A password holding `/` (base64), in each form: masked to the last `@`.
        "rediss://default:Zm9v/YmFy+cQ==@redis.example:6380/0",
        "redis://default:Zm9v/YmFy+cQ==@redis.example:port/0",
        "redis+sentinel://default:Zm9v/YmFy+cQ==@s1:26379/m/x",
        "redis+cluster://default:Zm9v/YmFy+cQ==@h1:7000/5",
    ],
)
async def test_bad_url_message_hides_the_password(url: str) -> None:
    password = url.partition("://")[2].rpartition("@")[0].partition(":")[2]
    err = config_error({"redis": {"url": url}})
    for part in {password, *password.split("/")}:
        assert part not in str(err)
    assert "***" in str(err)
    with pytest.raises(ConfigError) as flag:
        apply_overrides(Config(), redis=url)
    assert flag.value.key == "--redis"
    assert password.split("/")[0] not in str(flag.value)


async def test_a_password_holding_a_slash_is_read_whole_in_the_replicated_forms() -> None:
    target = parse_redis_url("redis.url", "redis+sentinel://u:Zm9v/YmFy@s1:26379,s2/m/1")
    assert (target.password, target.nodes, target.master, target.db) == (
        "Zm9v/YmFy",
        (("s1", 26379), ("s2", 26379)),
        "m",
        1,
    )


async def test_redacted_keeps_everything_but_the_password() -> None:
    assert (
        redacted(f"redis+sentinel://u:{SECRET}@a:1,b:2/m/1") == "redis+sentinel://u:***@a:1,b:2/m/1"
    )
    assert redacted("redis://a:1/0") == "redis://a:1/0"
    assert redacted("rediss://d:Zm9v/YmFy+cQ==@r:6380/0") == "rediss://d:***@r:6380/0"


@pytest.mark.parametrize(
    "url", [f"redis+sentinel://u:{SECRET}@127.0.0.1:26379", "redis+cluster://h1:7000/9"]
)
async def test_cli_exits_2_naming_redis_url(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f"storage:\n  path: {tmp_path / 'data'}\nredis:\n  url: '{url}'\n")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert "redis.url" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- a mirror on each topology ----------------------------------------------------------------


async def pull_image(client: Client, repo: str, image: dict[str, Any], hub: FakeHub) -> None:
    """What a docker pull does: the manifest by tag, then every blob; each byte checked."""
    resp = await client.get(f"/v2/{repo}/manifests/latest", headers=ACCEPT)
    assert resp.status == 200, await resp.text()
    assert await resp.read() == image["manifest"]
    for digest in (image["config"], *image["layers"]):
        blob = await client.get(f"/v2/{repo}/blobs/{digest}")
        assert blob.status == 200, await blob.text()
        assert await blob.read() == hub.content.blobs[digest]


async def metric(client: Client, name: str) -> float | None:
    for line in (await (await client.get("/metrics")).text()).splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_mirror_serves_pulls_on_each_topology(
    request: pytest.FixtureRequest, hub: FakeHub, make_client: MakeClient, topology: str
) -> None:
    url = flushed_redis_url(request, topology)
    image = hub.content.add_image("library/app", "latest", [b"layer-1", b"layer-2"])
    client = await make_client(redis=RedisConfig(url=url))

    await pull_image(client, "library/app", image, hub)
    hub.reset_stats()
    await pull_image(client, "library/app", image, hub)  # the tag now answered from Redis

    assert hub.stats["manifest_get"] == hub.stats["manifest_head"] == 0
    assert (await client.get("/readyz")).status == 200
    assert await metric(client, "mirror_metadata_up") == 1
    catalog = await (await client.get("/v2/_catalog")).json()
    assert catalog["repositories"] == ["library/app"]
    # The record is in that Redis (a second mirror on it would see it).
    records = await client.app[metadata_key].tags()
    assert [(repo, tag) for _, repo, tag, _ in records] == [("library/app", "latest")]


# --- Sentinel failover during pulls -----------------------------------------------------------


def tag_records_on(port: int) -> list[dict[str, Any]]:
    """The tag records held by the Redis on `port`, read directly."""
    keys = redis_command(port, "KEYS", "mirror:tag:*").split()
    return [json.loads(redis_command(port, "GET", key)) for key in keys]


@pytest.mark.e2e
@pytest.mark.parametrize("switch", ["sigkill", "sentinel-failover"])
async def test_sentinel_failover_during_pulls_fails_no_pull(
    tmp_path: Path, hub: FakeHub, make_client: MakeClient, switch: str
) -> None:
    """The master SIGKILLed, or demoted by SENTINEL FAILOVER (it then answers writes with
    READONLY): pulls go on, and the records go to the new master once it is elected."""
    require_redis_tools()
    image = hub.content.add_image("library/app", "latest", [os.urandom(200_000), b"small"])
    with RedisSentinelSetup(tmp_path / "sentinel") as setup:
        # tag_ttl 0: every pull revalidates the tag and writes its record to Redis.
        client = await make_client(redis=RedisConfig(url=setup.url), cache=CacheConfig(tag_ttl=0))
        old_master = setup.master.port
        await pull_image(client, "library/app", image, hub)
        assert tag_records_on(old_master), "the record was not written to the master"

        failures: list[str] = []
        pulls, slowest = 0, 0.0

        async def puller() -> None:
            nonlocal pulls, slowest
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await pull_image(client, "library/app", image, hub)
                    pulls += 1
                    slowest = max(slowest, time.monotonic() - started)
                except AssertionError as exc:
                    failures.append(str(exc)[:300])
                await asyncio.sleep(0.05)

        stop = asyncio.Event()
        workers = [asyncio.create_task(puller()) for _ in range(3)]
        await asyncio.sleep(1)
        killed_at = time.time()
        if switch == "sigkill":
            os.kill(setup.master.pid, signal.SIGKILL)  # the master, by its pid
        else:
            redis_command(setup.sentinel.port, "SENTINEL", "FAILOVER", MASTER_NAME)
        new_master, written = None, False
        deadline = time.monotonic() + RECOVERY_BOUND
        while time.monotonic() < deadline and not written:
            await asyncio.sleep(0.5)
            new_master = await asyncio.to_thread(setup.master_port)
            if new_master not in (None, old_master):
                records = await asyncio.to_thread(tag_records_on, new_master)
                written = any(record["checked_at"] > killed_at for record in records)
        took = time.time() - killed_at
        stop.set()
        await asyncio.gather(*workers)
        up = await metric(client, "mirror_metadata_up")

    print(
        f"{switch}: {pulls} pulls; master {old_master} -> {new_master}, written to it "
        f"{took:.1f} s after the switch; slowest pull {slowest:.2f} s; failures: {failures}"
    )
    assert failures == []
    assert pulls > 0
    assert new_master == setup.replica.port
    assert written, "no tag record written to the new master"
    assert up == 1


# --- Redis lost entirely, and back ------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
async def test_redis_lost_entirely_then_back(
    tmp_path: Path, hub: FakeHub, make_client: MakeClient, topology: str
) -> None:
    require_redis_tools()
    image = hub.content.add_image("library/app", "latest", [b"layer-1"])
    setup: RedisSentinelSetup | RedisClusterSetup = (
        RedisSentinelSetup(tmp_path / topology)
        if topology == "sentinel"
        else RedisClusterSetup(tmp_path / topology)
    )
    with setup:
        client = await make_client(redis=RedisConfig(url=setup.url), cache=CacheConfig(tag_ttl=0))
        await pull_image(client, "library/app", image, hub)
        metadata = client.app[metadata_key]
        assert isinstance(metadata, FallbackMetadata) and metadata.up

        await asyncio.to_thread(setup.stop)  # every process of it, by pid
        await pull_image(client, "library/app", image, hub)  # served, from memory
        assert await metric(client, "mirror_metadata_up") == 0
        assert (await client.get("/readyz")).status == 503

        await asyncio.to_thread(setup.start)  # back, empty
        started = time.monotonic()
        while time.monotonic() - started < RECOVERY_BOUND and not metadata.up:
            await pull_image(client, "library/app", image, hub)
            await asyncio.sleep(0.5)
        print(f"{topology}: metadata up again {time.monotonic() - started:.1f} s after restart")
        assert metadata.up
        await pull_image(client, "library/app", image, hub)
        assert (await client.get("/readyz")).status == 200
        records = await metadata.tags()
        assert [(repo, tag) for _, repo, tag, _ in records] == [("library/app", "latest")]


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_a_burst_is_not_taken_for_an_outage(
    request: pytest.FixtureRequest, topology: str
) -> None:
    """Sentinel's and Cluster's pools raise past their size instead of waiting: 300 lookups
    at once must still all reach Redis, none falling back to memory."""
    changes: list[bool] = []
    store = open_metadata(flushed_redis_url(request, topology), ttl=600, on_change=changes.append)
    record = TagRecord("sha256:" + "a" * 64, "application/json", 10, time.time())
    try:
        await store.put_tag("hub", "library/app", "latest", record)
        answers = await asyncio.gather(
            *(store.get_tag("hub", "library/app", "latest") for _ in range(300))
        )
    finally:
        await store.close()
    assert changes == []  # never marked down, not even for a moment
    assert answers == [record] * 300


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_a_burst_of_bucket_reads_is_not_taken_for_an_outage(
    request: pytest.FixtureRequest, topology: str
) -> None:
    """The bucket's read records (every redirect of a blob this process has not seen asks
    one) take turns as tag records do: a burst finds each record, none in memory."""
    changes: list[bool] = []
    store = open_metadata(flushed_redis_url(request, topology), ttl=600, on_change=changes.append)
    digests = [f"sha256:{n:064x}" for n in range(300)]
    try:
        await asyncio.gather(*(store.put_blob_read(digest, 10, 1.0) for digest in digests))
        answers = await asyncio.gather(*(store.get_blob_read(digest) for digest in digests))
        everything = await asyncio.gather(*(store.blob_reads() for _ in range(100)))
        await asyncio.gather(*(store.forget_blob(digest) for digest in digests))
        left = await store.blob_reads()
    finally:
        await store.close()
    assert changes == []
    assert answers == [(10, 1.0)] * 300
    assert all(len(reads) == 300 for reads in everything)
    assert left == {}


@pytest.mark.parametrize(
    "form",
    [
        "redis://127.0.0.1:{port}/0",
        "redis+sentinel://127.0.0.1:{port}/m",
        "redis+cluster://127.0.0.1:{port}",
    ],
)
async def test_unreachable_at_start_serves_from_memory(
    hub: FakeHub, make_client: MakeClient, form: str
) -> None:
    """Nothing listening (Sentinel: MasterNotFoundError; Cluster: RedisClusterException,
    not a RedisError): the mirror starts and serves, and says so in /readyz."""
    image = hub.content.add_image("library/app", "latest", [b"layer-1"])
    client = await make_client(redis=RedisConfig(url=form.format(port=free_port())))

    await pull_image(client, "library/app", image, hub)
    await pull_image(client, "library/app", image, hub)

    assert await metric(client, "mirror_metadata_up") == 0
    assert (await client.get("/readyz")).status == 503
