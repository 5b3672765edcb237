"""Helpers of the cluster tests (real replica processes): a replica's `cluster:` section, the
fake hub's knobs, a metric summed over replicas, the bucket's `storage:` section."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from tests.resilience_helpers import metric_value
from tests.rgw import CephRGW
from tests.services import FakeHubProcess, MirrorProcess

SECRET = "replicas-share-this-secret-0123456789"


def cluster_section(
    tmp_path: Path, replica: MirrorProcess, index: int, lease_ttl: float
) -> dict[str, Any]:
    """Replica `index`'s `cluster:` section: advertised at its own URL, the shared secret
    written under `tmp_path`."""
    secret = tmp_path / "cluster-secret"
    secret.write_text(SECRET)
    return {
        "advertise_url": replica.url,
        "secret_file": str(secret),
        "lease_ttl": f"{lease_ttl}s",
        "replica_id": f"r{index}",
    }


def set_knobs(hub: FakeHubProcess, **knobs: Any) -> None:
    request = urllib.request.Request(
        f"{hub.registry_url}/_knobs", data=json.dumps(knobs).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


async def metric(
    session: aiohttp.ClientSession,
    replicas: Sequence[MirrorProcess],
    name: str,
    labels: dict[str, str] | None = None,
) -> float:
    """One series summed over replicas (every upstream label for upstream bytes)."""
    total = 0.0
    for replica in replicas:
        async with session.get(f"{replica.url}/metrics") as resp:
            text = await resp.text()
        for line in text.splitlines():
            value = metric_value(line, name, labels)
            total += value or 0.0
    return total


def s3_section(rgw: CephRGW, bucket: str) -> dict[str, Any]:
    return {
        "s3": {
            "bucket": bucket,
            "endpoint": rgw.endpoint,
            "region": rgw.region,
            "prefix": "cache/",
            "access_key_id": rgw.access_key,
            "secret_access_key": rgw.secret_key,
        }
    }


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
