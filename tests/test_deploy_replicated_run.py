"""deploy/compose.replicated.config.yaml and deploy/haproxy/haproxy.cfg, run for real.

Three `mirror serve` processes read the shipped replicated config (with this machine's
addresses: Ceph RGW for the bucket, a real Redis, the fake Docker Hub, loopback ports)
behind a real haproxy running the shipped config. Pulls through the load balancer get the
right bytes from whichever replica answers, and each digest comes from the upstream once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.fakehub import DOCKER_MANIFEST, FakeHub
from tests.rgw import CephRGW
from tests.services import MirrorProcess, RedisServer
from tests.test_deploy import DEPLOY
from tests.test_haproxy_example import HAPROXY, ShippedHAProxy

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (make test installs it)"),
]
REPLICAS = 3
ROUNDS = 3


class Replica(MirrorProcess):
    """A mirror process reading a config file, with the environment compose would give it."""

    def __init__(self, workdir: Path, hub: FakeHub, redis_url: str, env: dict[str, str]) -> None:
        super().__init__(workdir, hub.registry_url, redis_url)
        self.env = env
        self.config_path = self.workdir / "config.yaml"
        # --listen, --upstream, --storage and --redis override the file, as flags do.
        self.extra_args = ("--config", str(self.config_path))

    def popen_kwargs(self) -> dict[str, Any]:
        kwargs = super().popen_kwargs()
        return {**kwargs, "env": {**kwargs["env"], **self.env}}


async def _blob_requests(session: aiohttp.ClientSession, url: str) -> float:
    """Blob GETs a replica has answered, from its /metrics."""
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    pattern = r'^mirror_http_requests_total\{[^}]*route="blob"[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def _replica(
    i: int, tmp_path: Path, hub: FakeHub, redis: RedisServer, rgw: CephRGW, bucket: str
) -> Replica:
    secret = tmp_path / "cluster-secret"  # one secret for all, as compose's secret file
    if not secret.exists():
        secret.write_text("a-shared-secret-for-this-test-only-0123456789\n")
    env = {
        "ADVERTISE_HOST": "127.0.0.1",
        "AWS_ACCESS_KEY_ID": rgw.access_key,
        "AWS_SECRET_ACCESS_KEY": rgw.secret_key,
    }
    replica = Replica(tmp_path / f"mirror-{i}", hub, redis.url, env)
    raw = yaml.safe_load((DEPLOY / "compose.replicated.config.yaml").read_text())
    raw["storage"]["s3"].update(endpoint=rgw.endpoint, bucket=bucket)
    cluster = raw["cluster"]
    cluster["secret_file"] = str(secret)
    assert cluster["advertise_url"] == "http://${ADVERTISE_HOST}:8083"
    cluster["advertise_url"] = f"http://${{ADVERTISE_HOST}}:{replica.port}"
    replica.config_path.write_text(yaml.safe_dump(raw))
    return replica


async def test_pulls_through_haproxy_over_three_replicas_of_the_shipped_config(
    hub: FakeHub, rgw: CephRGW, redis_server: RedisServer, tmp_path: Path
) -> None:
    image = hub.content.add_image("library/app", "1.0", [os.urandom(3 * 1024**2), b"x" * 500])
    bucket = rgw.new_bucket_name()
    rgw.s3().create_bucket(bucket)
    replicas = [_replica(i, tmp_path, hub, redis_server, rgw, bucket) for i in (1, 2, 3)]
    started: list[Any] = []
    try:
        for service in replicas:
            # start() blocks until ready: in a thread, so this loop keeps serving the hub.
            started.append(await asyncio.to_thread(service.start))
        lb = ShippedHAProxy(tmp_path / "haproxy", [r.port for r in replicas])
        started.append(await asyncio.to_thread(lb.start))
        blobs = [*image["layers"], image["config"]]
        async with aiohttp.ClientSession() as session:
            for _ in range(ROUNDS):
                url = f"{lb.url}/v2/library/app/manifests/1.0"
                async with session.get(url, headers={"Accept": DOCKER_MANIFEST}) as resp:
                    assert resp.status == 200, await resp.text()
                    assert resp.headers["Docker-Content-Digest"] == image["digest"]
                for digest in blobs:
                    async with session.get(f"{lb.url}/v2/library/app/blobs/{digest}") as resp:
                        assert resp.status == 200
                        body = await resp.read()
                    assert f"sha256:{hashlib.sha256(body).hexdigest()}" == digest
            assert hub.stats["manifest_get"] == 1
            assert dict(hub.stats.cdn_get_by_digest) == dict.fromkeys(blobs, 1)
            listed = rgw.s3().client.list_objects_v2(Bucket=bucket).get("Contents", [])
            keys = {o["Key"] for o in listed}
            assert {f"blobs/sha256/{d.split(':')[1]}" for d in blobs} <= keys
            assert f"manifests/sha256/{image['digest'].split(':')[1]}" in keys
            for replica in replicas:
                async with session.get(f"{replica.url}/readyz") as resp:
                    checks = await resp.json()
                assert resp.status == 200 and checks["bucket"] == "ok", checks

            # Concurrent cold GETs of one blob, spread over the replicas by the balancer,
            # while the upstream sends it slowly: still one upstream fetch.
            big = hub.content.add_image("library/big", "1.0", [os.urandom(8 * 1024**2)])
            (layer,) = big["layers"]
            hub.cdn_delay = 0.005

            async def get_layer() -> str:
                url = f"{lb.url}/v2/library/big/blobs/{layer}"
                async with session.get(url) as resp:
                    assert resp.status == 200
                    return f"sha256:{hashlib.sha256(await resp.read()).hexdigest()}"

            got = await asyncio.gather(*[get_layer() for _ in range(2 * REPLICAS)])
            assert got == [layer] * (2 * REPLICAS)
            assert hub.stats.cdn_get_by_digest[layer] == 1
            # Round robin: every replica answered blob requests.
            answered = [await _blob_requests(session, replica.url) for replica in replicas]
            assert all(answered), answered
    finally:
        for service in reversed(started):
            await asyncio.to_thread(service.stop)
