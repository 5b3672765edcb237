"""Replicas that reach each other over HTTPS with a private CA (cluster.ca_file), and a
peer whose certificate does not verify: refused and counted, the client still served.

    clients (HTTP) -> 2 mirror processes (cluster:, one Redis, HTTPS listeners signed by
                      a test CA, advertised as https://) -> fake hub (CDN slowed) -> distribution
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import pytest

from mirror.config import ConfigError, config_from_mapping
from tests.certs import CA, TLSMirror
from tests.cluster_helpers import SECRET, metric, set_knobs
from tests.redis_topologies import flushed_redis_url
from tests.resilience_helpers import RandomImage, seed_random_image
from tests.services import DistributionRegistry, FakeHubProcess

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    with DistributionRegistry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


@pytest.fixture(scope="module")
def image(registry: DistributionRegistry) -> RandomImage:
    return seed_random_image(registry.url, "tlspeers", 8 * MiB, seed=83)


@pytest.fixture
def hub(
    tmp_path: Path, registry: DistributionRegistry, image: RandomImage
) -> Iterator[FakeHubProcess]:
    with FakeHubProcess(registry.url, workdir=tmp_path / "fakehub") as hub:
        yield hub


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return CA(tmp_path_factory.mktemp("ca"))


def start_tls_cluster(
    stack: ExitStack, tmp_path: Path, hub: FakeHubProcess, redis_url: str, ca: CA, trusted: Path
) -> list[TLSMirror]:
    """Two replicas advertising their HTTPS listeners; `trusted`: their cluster.ca_file."""
    secret = tmp_path / "cluster-secret"
    secret.write_text(SECRET)
    server = ca.issue("replica")
    replicas = []
    for index in range(2):
        workdir = tmp_path / f"replica{index}"
        tls = {"cert_file": str(server.cert), "key_file": str(server.key)}
        replica = TLSMirror(workdir, hub.registry_url, ca.cert, tls)
        written = json.loads(replica.config_path.read_text())  # its tls section, port chosen
        config = {
            **written,
            "redis": {"url": redis_url},
            "cluster": {
                "advertise_url": replica.tls_url,
                "secret_file": str(secret),
                "lease_ttl": "2s",
                "replica_id": f"r{index}",
                "ca_file": str(trusted),
            },
        }
        replica.config_path.write_text(json.dumps(config) + "\n")
        replicas.append(stack.enter_context(replica))
    return replicas


async def cold_gets(
    session: aiohttp.ClientSession, replicas: list[TLSMirror], image: RandomImage
) -> list[bytes]:
    async def get(replica: TLSMirror) -> bytes:
        async with session.get(f"{replica.url}{image.blob_path}") as resp:
            assert resp.status == 200
            return await resp.read()

    return await asyncio.gather(*(get(replicas[i % 2]) for i in range(4)))


@pytest.mark.e2e
async def test_replicas_stream_to_each_other_over_https_with_a_private_ca(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    image: RandomImage,
    ca: CA,
    session: aiohttp.ClientSession,
) -> None:
    with ExitStack() as stack:
        redis_url = flushed_redis_url(request, "single")
        replicas = start_tls_cluster(stack, tmp_path, hub, redis_url, ca, ca.cert)
        set_knobs(hub, cdn_delay=0.01)  # the owner is still downloading when the other asks

        bodies = await cold_gets(session, replicas, image)

        assert all(body == image.data for body in bodies)
        assert hub.stats()["cdn_get_by_digest"] == {image.layer_digest: 1}
        streams = "mirror_cluster_peer_streams_total"
        # The follower's two clients share its one stream from the owner.
        assert await metric(session, replicas, streams, {"direction": "in"}) == 1
        assert await metric(session, replicas, "mirror_cluster_peer_untrusted_total") == 0


@pytest.mark.e2e
async def test_a_peer_whose_certificate_does_not_verify_is_refused_and_counted(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    hub: FakeHubProcess,
    image: RandomImage,
    ca: CA,
    session: aiohttp.ClientSession,
) -> None:
    """The replicas trust another CA than the one that signed their listeners: no byte is
    taken from the owner; the follower waits out the owner's lease and serves the blob."""
    other = CA(tmp_path / "other-ca", name="another CA")
    with ExitStack() as stack:
        redis_url = flushed_redis_url(request, "single")
        replicas = start_tls_cluster(stack, tmp_path, hub, redis_url, ca, other.cert)
        set_knobs(hub, cdn_delay=0.01)

        bodies = await cold_gets(session, replicas, image)

        assert all(body == image.data for body in bodies)
        assert await metric(session, replicas, "mirror_cluster_peer_untrusted_total") >= 1
        streams = "mirror_cluster_peer_streams_total"
        assert await metric(session, replicas, streams, {"direction": "in"}) == 0


def test_half_a_client_pair_is_refused_at_load(tmp_path: Path, ca: CA) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    pair = ca.issue("peer-client", client=True)
    cluster = {
        "advertise_url": "https://10.0.0.1:8443",
        "secret_file": str(secret),
        "cert_file": str(pair.cert),
    }
    with pytest.raises(ConfigError, match="cluster.key_file"):
        config_from_mapping({"redis": {"url": "redis://127.0.0.1:1"}, "cluster": cluster})
    cluster = {**cluster, "key_file": str(pair.key), "ca_file": str(tmp_path / "missing.crt")}
    with pytest.raises(ConfigError, match="cluster.ca_file"):
        config_from_mapping({"redis": {"url": "redis://127.0.0.1:1"}, "cluster": cluster})
    cluster["ca_file"] = str(ca.cert)
    loaded = config_from_mapping({"redis": {"url": "redis://127.0.0.1:1"}, "cluster": cluster})
    assert loaded.cluster is not None
    assert loaded.cluster.client_pair == (pair.cert, pair.key)
