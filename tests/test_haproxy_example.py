"""deploy/haproxy/haproxy.cfg run by a real haproxy (Debian's) in front of three mirrors.

Only the addresses are rewritten (compose's service names and ports become loopback
ports); everything else is the shipped file: round robin with no stickiness, health checks
on /healthz, a request whose replica is gone sent to another one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.config import Config, StorageConfig, UpstreamConfig
from mirror.web.app import create_app
from tests.services import Service, free_port, http_status
from tests.test_deploy import HAPROXY_CFG, exported_metric_names

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)
pytestmark = pytest.mark.skipif(
    HAPROXY is None,
    reason="haproxy is not installed (Debian package haproxy; make test installs it)",
)
REPLICAS = 3


class ShippedHAProxy(Service):
    """haproxy in the foreground with the shipped config, pointed at loopback replicas."""

    name = "haproxy"

    def __init__(self, workdir: Path, replica_ports: list[int]) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.health_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.workdir / "haproxy.cfg"
        self.config_path.write_text(self._rewrite(HAPROXY_CFG.read_text(), replica_ports))

    def _rewrite(self, text: str, ports: list[int]) -> str:
        text = text.replace("bind :8083", f"bind 127.0.0.1:{self.port}")
        text = text.replace("bind :8404", f"bind 127.0.0.1:{self.health_port}")
        servers = iter(ports)
        text, count = re.subn(
            r"(server mirror-\d+) mirror-\d+:8083",
            lambda m: f"{m.group(1)} 127.0.0.1:{next(servers)}",
            text,
        )
        assert count == len(ports), "the shipped config names another number of replicas"
        return text

    def command(self) -> list[str]:
        assert HAPROXY is not None
        return [HAPROXY, "-db", "-f", str(self.config_path)]

    def is_ready(self) -> bool:
        return http_status(f"http://127.0.0.1:{self.health_port}/healthz") == 200


def _config(path: Path) -> Config:
    return Config(
        host="127.0.0.1",
        port=0,
        # Nothing listens there; /v2/ and /healthz never ask the upstream anything.
        upstream=UpstreamConfig(url="http://127.0.0.1:9", connect_timeout=1, read_timeout=1),
        storage=StorageConfig(path=path),
    )


async def _registry_requests(session: aiohttp.ClientSession, url: str) -> float:
    """Requests to the registry API (/v2/) a mirror has answered, from its /metrics."""
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    assert "mirror_http_requests_total" in exported_metric_names(text)
    pattern = r'^mirror_http_requests_total\{[^}]*route="base"[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


@pytest.fixture
async def replicas(aiohttp_server: Any, tmp_path: Path) -> list[Any]:
    return [
        await aiohttp_server(create_app(_config(tmp_path / f"data-{i}"))) for i in range(REPLICAS)
    ]


@pytest.fixture
async def haproxy(replicas: list[Any], tmp_path: Path) -> AsyncIterator[ShippedHAProxy]:
    lb = ShippedHAProxy(tmp_path / "haproxy", [r.port for r in replicas])
    # start() blocks until ready: in a thread, so this loop keeps serving the replicas.
    await asyncio.to_thread(lb.start)
    yield lb
    await asyncio.to_thread(lb.stop)


async def test_round_robin_spreads_requests_evenly_without_stickiness(
    replicas: list[Any], haproxy: ShippedHAProxy
) -> None:
    rounds = 4
    # One client connection, kept alive: no stickiness means it still reaches every replica.
    async with aiohttp.ClientSession() as session:
        for _ in range(rounds * REPLICAS):
            async with session.get(f"{haproxy.url}/v2/") as resp:
                assert resp.status == 200, await resp.text()
        counts = [await _registry_requests(session, f"http://127.0.0.1:{r.port}") for r in replicas]
    assert counts == [rounds] * REPLICAS


async def test_a_replica_gone_costs_no_request(
    replicas: list[Any], haproxy: ShippedHAProxy
) -> None:
    await replicas[1].close()  # its port now refuses connections
    async with aiohttp.ClientSession() as session:
        for _ in range(4 * REPLICAS):
            async with session.get(f"{haproxy.url}/v2/") as resp:
                assert resp.status == 200, await resp.text()
        alive = [
            await _registry_requests(session, f"http://127.0.0.1:{r.port}")
            for r in (replicas[0], replicas[2])
        ]
    assert sum(alive) == 4 * REPLICAS


async def test_replicas_see_the_client_haproxy_saw(
    aiohttp_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With haproxy in their trusted_proxies, the replicas log (and throttle logins by) the
    address the client connected from, not haproxy's, nor one the client made up."""
    trusted = (ipaddress.ip_network("127.0.0.1/32"),)  # haproxy connects from 127.0.0.1
    replicas = [
        await aiohttp_server(
            create_app(replace(_config(tmp_path / f"d{i}"), trusted_proxies=trusted))
        )
        for i in range(REPLICAS)
    ]
    lb = ShippedHAProxy(tmp_path / "haproxy", [r.port for r in replicas])
    await asyncio.to_thread(lb.start)
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    try:
        # The client from another loopback address than haproxy's.
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            for forged in ({}, {"X-Forwarded-For": "6.6.6.6"}, {"X-Forwarded-For": "127.0.0.1"}):
                async with session.get(f"{lb.url}/v2/", headers=forged) as resp:
                    assert resp.status == 200, await resp.text()
    finally:
        await asyncio.to_thread(lb.stop)
    seen = [
        r.access["remote"]
        for r in caplog.records
        if isinstance(getattr(r, "access", None), dict) and r.access["path"] == "/v2/"
    ]
    assert seen == ["127.0.0.2"] * 3
