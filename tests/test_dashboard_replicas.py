"""The dashboard's Replicas rows against a real Prometheus scraping three mirrors.

"Per replica" panels must give one series per scraped mirror (split by `instance`), and
"cluster totals" panels series without an `instance` (summed over replicas). Checked on
the answers of Prometheus itself, not on the expression text.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.config import Config, StorageConfig, UpstreamConfig
from mirror.web.app import create_app
from tests.test_deploy import DASHBOARD, _panels
from tests.test_prometheus import PrometheusServer, _api, _fill_variables, _wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus is not installed (Debian package prometheus; make test installs it)",
)
REPLICAS = 3


def _rows() -> dict[str, list[tuple[str, str]]]:
    """Row title → (panel title, expression) of the panels under it."""
    rows: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for panel in _panels(json.loads(DASHBOARD.read_text())):
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], [])
            continue
        current += [(panel["title"], t["expr"]) for t in panel["targets"] if t.get("expr")]
    return rows


def _config(path: Path) -> Config:
    return Config(
        host="127.0.0.1",
        port=0,
        # Nothing listens there: manifest requests make upstream requests that fail.
        upstream=UpstreamConfig(url="http://127.0.0.1:9", connect_timeout=1, read_timeout=1),
        storage=StorageConfig(path=path),
    )


async def test_replica_panels_split_by_instance_and_cluster_panels_sum(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    mirrors = [
        await aiohttp_server(create_app(_config(tmp_path / f"data-{i}"))) for i in range(REPLICAS)
    ]
    instances = {f"127.0.0.1:{m.port}" for m in mirrors}
    async with aiohttp.ClientSession() as session:
        for instance in instances:  # registry requests and upstream fetches of each kind
            async with session.get(f"http://{instance}/v2/") as resp:
                assert resp.status == 200
            for path in ("manifests/1.0", f"blobs/sha256:{'ab' * 32}"):
                async with session.get(f"http://{instance}/v2/library/app/{path}") as resp:
                    assert resp.status >= 400
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    prometheus = PrometheusServer(
        workdir,
        {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [
                {"job_name": "mirror", "static_configs": [{"targets": sorted(instances)}]}
            ],
        },
    )
    await asyncio.to_thread(prometheus.start)
    try:
        async with aiohttp.ClientSession() as session:
            query = f"{prometheus.url}/api/v1/query"

            async def answer(expr: str) -> list[dict[str, Any]]:
                data = await _api(session, query, query=_fill_variables(expr))
                return list(data["result"])

            rows = _rows()
            per_replica = rows["Replicas: per replica"]
            totals = rows["Replicas: cluster totals (summed over replicas)"]
            assert per_replica and totals
            for title, expr in per_replica:
                # rate() needs two scrapes of each target.
                async def every_instance(expr: str = expr) -> list[dict[str, Any]]:
                    got = await answer(expr)
                    return got if {s["metric"].get("instance") for s in got} == instances else []

                await _wait_for(f"{title!r}: a series per replica", every_instance)
            # A panel's targets may be empty while others answer (no upstream bytes yet).
            panels: dict[str, list[str]] = {}
            for title, expr in totals:
                panels.setdefault(title, []).append(expr)
            for title, exprs in panels.items():

                async def some(exprs: list[str] = exprs) -> list[dict[str, Any]]:
                    return [s for expr in exprs for s in await answer(expr)]

                result = await _wait_for(f"{title!r}: a cluster total", some)
                for series in result:
                    assert "instance" not in series["metric"], f"{title!r}: {series['metric']}"
            # The replica count is the number of mirrors scraped.
            (count,) = await answer(next(e for t, e in totals if t == "Replicas scraped"))
            assert count["value"][1] == str(REPLICAS)
    finally:
        await asyncio.to_thread(prometheus.stop)
