"""A real Prometheus (Debian's `prometheus`) scrapes a running mirror and sees its series.

The same Prometheus loads deploy/prometheus/alerts.yml and evaluates every rule against the
live series, and answers every query of the Grafana dashboard: both must be valid PromQL
to a real server, not only to promtool's parser.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mirror.config import Config, StorageConfig, UpstreamConfig
from mirror.config.s3 import S3Config
from mirror.web.app import create_app
from tests.services import Service, free_port, http_status
from tests.test_deploy import ALERTS, DASHBOARD, alert_rules, dashboard_exprs

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus is not installed (Debian package prometheus; make test installs it)",
)

WAIT = 30.0
# Grafana's variables, as the dashboard would have them filled in.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "5m",
    "$__interval": "15s",
    "$instance": ".*",
}


class PrometheusServer(Service):
    """`prometheus` on a free port, with its TSDB in the work directory."""

    name = "prometheus"

    def __init__(self, workdir: Path | str, config: dict[str, Any]) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def command(self) -> list[str]:
        return [
            "prometheus",
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]

    def is_ready(self) -> bool:
        return http_status(f"{self.url}/-/ready") == 200


async def _api(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with session.get(url, params=params) as resp:
        body = await resp.json()
    assert body["status"] == "success", f"{url} {params}: {body}"
    return body["data"]


async def _wait_for(what: str, check: Any) -> Any:
    """Poll the coroutine function `check` until it returns something truthy."""
    deadline = time.monotonic() + WAIT
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT:.0f}s: {what}")
        await asyncio.sleep(0.25)


def _fill_variables(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def _mirror_config(tmp_path: Path, s3: S3Config | None = None) -> Config:
    return Config(
        host="127.0.0.1",
        port=0,
        # Nothing listens there; scrapes never make the mirror ask its upstream anything.
        upstream=UpstreamConfig(url="http://127.0.0.1:9", connect_timeout=1, read_timeout=1),
        storage=StorageConfig(path=tmp_path / "data", s3=s3),
    )


def _prometheus_for(tmp_path: Path, mirror_port: int) -> PrometheusServer:
    """A Prometheus scraping the mirror on `mirror_port` as job "mirror", with the rules."""
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    shutil.copy(ALERTS, workdir / ALERTS.name)
    return PrometheusServer(
        workdir,
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [ALERTS.name],
            "scrape_configs": [
                {
                    "job_name": "mirror",
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": [f"127.0.0.1:{mirror_port}"]}],
                }
            ],
        },
    )


async def test_prometheus_scrapes_the_mirror(aiohttp_server: Any, tmp_path: Path) -> None:
    mirror = await aiohttp_server(create_app(_mirror_config(tmp_path)))
    prometheus = _prometheus_for(tmp_path, mirror.port)
    # start() blocks until ready: in a thread, so this loop keeps serving the mirror.
    await asyncio.to_thread(prometheus.start)
    try:
        async with aiohttp.ClientSession() as session:
            query = f"{prometheus.url}/api/v1/query"

            async def target_up() -> bool:
                data = await _api(session, query, query='up{job="mirror"}')
                return [r["value"][1] for r in data["result"]] == ["1"]

            await _wait_for('up{job="mirror"} == 1', target_up)

            async def request_series() -> list[dict[str, Any]]:
                data = await _api(session, query, query='mirror_http_requests_total{job="mirror"}')
                return list(data["result"])

            # The scrapes themselves are requests the mirror counts.
            series = await _wait_for("mirror_http_requests_total series", request_series)
            scrapes = {"route": "metrics", "method": "GET", "status": "200"}
            assert any(scrapes.items() <= s["metric"].items() for s in series), series
            assert {s["metric"]["instance"] for s in series} == {f"127.0.0.1:{mirror.port}"}

            # The unlabelled gauges are there from the first scrape.
            data = await _api(session, query, query='mirror_cache_size_bytes{job="mirror"}')
            assert [r["value"][1] for r in data["result"]] == ["0"]

            # Every alert rule loaded and evaluates without error against live series.
            wanted = {rule["alert"] for rule in alert_rules()}

            async def rules_evaluated() -> list[dict[str, Any]]:
                data = await _api(session, f"{prometheus.url}/api/v1/rules")
                rules = [r for g in data["groups"] for r in g["rules"]]
                done = [r for r in rules if not r["lastEvaluation"].startswith("0001-")]
                return rules if len(done) == len(rules) == len(wanted) else []

            rules = await _wait_for("every alert rule evaluated", rules_evaluated)
            assert {r["name"] for r in rules} == wanted
            for rule in rules:
                assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"

            # Every dashboard query is one this Prometheus accepts.
            exprs = dashboard_exprs()
            for title, expr in exprs:
                await _api(session, query, query=_fill_variables(expr))
                async with session.get(
                    f"{prometheus.url}/api/v1/query_range",
                    params={
                        "query": _fill_variables(expr),
                        "start": str(time.time() - 60),
                        "end": str(time.time()),
                        "step": "5",
                    },
                ) as resp:
                    body = await resp.json()
                assert body["status"] == "success", f"panel {title!r}: {body}"
            # The dashboard's instance variable finds this mirror.
            variable = next(
                v
                for v in json.loads(DASHBOARD.read_text())["templating"]["list"]
                if v["name"] == "instance"
            )
            match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            metric, label = match.groups()
            data = await _api(
                session, f"{prometheus.url}/api/v1/label/{label}/values", **{"match[]": metric}
            )
            assert data == [f"127.0.0.1:{mirror.port}"]
    finally:
        await asyncio.to_thread(prometheus.stop)


@pytest.mark.parametrize("kind", ["single-node", "s3"])
async def test_no_alert_fires_on_a_healthy_mirror(
    aiohttp_server: Any, tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    """Neither pending nor firing: a rule whose condition holds is pending at once, so a
    few evaluations of every rule against a healthy mirror's live series show it."""
    s3 = None
    if kind == "s3":
        rgw = request.getfixturevalue("rgw")  # skips without Ceph
        s3 = S3Config(
            bucket=request.getfixturevalue("s3_bucket"),
            endpoint=rgw.endpoint,
            region=rgw.region,
            access_key_id=rgw.access_key,
            secret_access_key=rgw.secret_key,
        )
    if shutil.disk_usage(tmp_path).free < 0.2 * shutil.disk_usage(tmp_path).total:
        pytest.skip("this machine's disk is nearly full: MirrorCacheNearlyFull would be right")
    mirror = await aiohttp_server(create_app(_mirror_config(tmp_path, s3)))
    prometheus = _prometheus_for(tmp_path, mirror.port)
    await asyncio.to_thread(prometheus.start)
    try:
        async with aiohttp.ClientSession() as session:
            exposition = await (await session.get(f"http://127.0.0.1:{mirror.port}/metrics")).text()
            assert ("mirror_s3_up " in exposition) == (s3 is not None)
            query = f"{prometheus.url}/api/v1/query"

            async def scraped() -> bool:
                data = await _api(session, query, query='up{job="mirror"} == 1')
                return bool(data["result"])

            await _wait_for("a first scrape of the mirror", scraped)
            # Evaluations from now on see the mirror's series.
            evaluated: dict[str, set[str]] = {rule["alert"]: set() for rule in alert_rules()}

            async def rules_evaluated_thrice() -> bool:
                data = await _api(session, f"{prometheus.url}/api/v1/rules")
                for rule in (r for g in data["groups"] for r in g["rules"]):
                    if rule["lastEvaluation"].startswith("0001-"):
                        continue  # not evaluated yet
                    assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
                    evaluated[rule["name"]].add(rule["lastEvaluation"])
                return min(map(len, evaluated.values())) >= 3

            await _wait_for("every alert rule evaluated", rules_evaluated_thrice)
            data = await _api(session, f"{prometheus.url}/api/v1/alerts")
            assert data["alerts"] == [], f"alerts on a healthy {kind} mirror: {data['alerts']}"
    finally:
        await asyncio.to_thread(prometheus.stop)
