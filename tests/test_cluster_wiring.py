"""`cluster:` wired into the config and the app: leases on their own Redis connection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mirror.cluster.lease import Lease, Leases
from mirror.config import ConfigError, RedisConfig, apply_overrides, config_from_mapping
from mirror.config.cluster import ClusterConfig
from mirror.web.keys import leases_key
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
