"""`cluster:` wired into the config and the app: leases on their own Redis connection."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mirror.cluster import peerauth
from mirror.cluster.lease import Lease, Leases
from mirror.config import ConfigError, RedisConfig, apply_overrides, config_from_mapping
from mirror.config.cluster import ClusterConfig
from mirror.web.keys import leases_key, metrics_key
from tests.conftest import MakeClient
from tests.services import RedisServer


def _secret(tmp_path: Path) -> str:
    path = tmp_path / "cluster-secret"
    path.write_text("k" * 32)
    return str(path)


def test_cluster_section_reaches_the_config(tmp_path: Path) -> None:
    config = config_from_mapping(
        {
            "redis": {"url": "redis://127.0.0.1:6379/0"},
            "cluster": {"advertise_url": "http://10.0.0.5:8083", "secret_file": _secret(tmp_path)},
        }
    )
    assert config.cluster is not None
    assert config.cluster.replica_id == "10.0.0.5:8083"
    assert config_from_mapping({}).cluster is None
    assert config_from_mapping({"cluster": None}).cluster is None


def test_cluster_without_redis_is_refused_naming_cluster(tmp_path: Path) -> None:
    raw = {"cluster": {"advertise_url": "http://a:8083", "secret_file": _secret(tmp_path)}}
    with pytest.raises(ConfigError) as raised:
        apply_overrides(config_from_mapping(raw))
    assert raised.value.key == "cluster"
    assert "redis.url" in str(raised.value)
    # The URL may come from the command line.
    config = apply_overrides(config_from_mapping(raw), redis="redis://127.0.0.1:6379/0")
    assert config.cluster is not None and config.redis.url


def test_the_cli_refuses_a_cluster_without_redis(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"cluster: {{advertise_url: 'http://a:8083', secret_file: '{_secret(tmp_path)}'}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "mirror: config: cluster: needs redis.url (or --redis): replicas share their state "
        "through Redis"
    ]


async def test_app_opens_leases_only_with_a_cluster(
    make_client: MakeClient, redis_server: RedisServer
) -> None:
    single = await make_client()
    assert single.app[leases_key] is None
    cluster = ClusterConfig("http://127.0.0.1:1", b"s" * 32, 2.0, "replica-a")
    replica = await make_client(redis=RedisConfig(url=redis_server.url), cluster=cluster)
    leases = replica.app[leases_key]
    assert isinstance(leases, Leases)
    lease = await leases.acquire("wiring-test")
    assert isinstance(lease, Lease)
    await lease.release()
    ready: Any = await (await replica.get("/readyz")).json()
    assert ready["replica"] == "replica-a"
    assert "replica" not in await (await single.get("/readyz")).json()
    metrics = await (await replica.get("/metrics")).text()
    assert 'mirror_cluster_replica_info{replica="replica-a"} 1.0' in metrics


async def test_a_malformed_peer_signature_is_refused_as_unsigned(
    make_client: MakeClient, redis_server: RedisServer
) -> None:
    """Signatures whose time or MAC is not ASCII: a 401 with the OCI error, counted, as
    for any signature that does not verify (not aiohttp's plain-text 500)."""
    cluster = ClusterConfig("http://127.0.0.1:1", b"s" * 32, 2.0, "replica-a")
    replica = await make_client(redis=RedisConfig(url=redis_server.url), cluster=cluster)
    now = str(int(time.time())).encode()
    path = b"/_cluster/blobs/sha256:" + b"a" * 64

    for value in ("\u00b2:00ff".encode(), now + ":\u00e9".encode(), now + b":\xff\xfe"):
        head = b"GET %s HTTP/1.1\r\nHost: a\r\n%s: %s\r\nConnection: close\r\n\r\n"
        answer = await raw_exchange(replica, head % (path, peerauth.HEADER.encode(), value))

        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert b'"code": "UNAUTHORIZED"' in answer
    registry = replica.app[metrics_key].registry
    assert registry.get_sample_value("mirror_cluster_peer_refused_total") == 3


async def raw_exchange(client: Any, request: bytes) -> bytes:
    """`request` as written (aiohttp's client sends no such header), the answer to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(request)
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer
