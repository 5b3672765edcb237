"""Every metric the Grafana dashboard and the alert rules query has a series on /metrics
after a real pull through the mirror, parsed as Prometheus itself would parse it.

tests/test_deploy.py checks the names against the `# TYPE` lines of a mirror that has
served nothing; this checks the samples: a labelled counter that has never been touched
exports no sample at all, so a panel over it reads "No data" rather than 0 and an alert
over it cannot tell "never happened" from "not scraped".
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MakeClient
from tests.fakehub import DOCKER_MANIFEST, FakeHub
from tests.test_deploy import PROMETHEUS_SERIES, alert_rules, dashboard_exprs, promql_metric_names

Client = TestClient[Any, Any]
Samples = dict[str, list[tuple[dict[str, str], float]]]


async def pull_everything_once(client: Client, hub: FakeHub) -> None:
    """A tag, its blobs cold then warm, a HEAD of each kind, a missing tag and blob."""
    image = hub.content.add_image("library/app", "latest", [b"layer one\n" * 300, b"two" * 99])
    headers = {"Accept": DOCKER_MANIFEST}
    resp = await client.get("/v2/library/app/manifests/latest", headers=headers)
    assert resp.status == 200, await resp.text()
    await resp.read()
    for _ in ("cold", "warm"):
        for digest in [image["config"], *image["layers"]]:
            resp = await client.get(f"/v2/library/app/blobs/{digest}")
            assert resp.status == 200, await resp.text()
            assert await resp.read() == hub.content.blobs[digest]
    resp = await client.head("/v2/library/app/manifests/latest", headers=headers)
    assert resp.status == 200
    resp = await client.head(f"/v2/library/app/blobs/{image['layers'][0]}")
    assert resp.status == 200
    resp = await client.get(f"/v2/library/app/manifests/{image['digest']}", headers=headers)
    assert resp.status == 200
    await resp.read()
    resp = await client.get("/v2/library/app/manifests/no-such-tag", headers=headers)
    assert resp.status == 404
    await resp.read()
    resp = await client.get("/v2/library/app/blobs/sha256:" + "0" * 64)
    assert resp.status == 404
    await resp.read()


async def scrape(client: Client) -> Samples:
    """Samples by name, as prometheus_client's own parser reads the exposition."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if labels.items() <= got.items())


async def test_the_pull_shows_in_the_metrics(hub: FakeHub, make_client: MakeClient) -> None:
    """The pull really happened, as the metrics tell it (so the next tests mean something)."""
    client = await make_client()
    await pull_everything_once(client, hub)
    samples = await scrape(client)
    assert value(samples, "mirror_cache_requests_total", kind="blob", result="miss") >= 3
    assert value(samples, "mirror_cache_requests_total", kind="blob", result="hit") >= 3
    assert value(samples, "mirror_served_bytes_total", source="cache") > 0
    assert value(samples, "mirror_served_bytes_total", source="upstream") > 0
    assert value(samples, "mirror_http_requests_total", route="manifest", status="404") == 1
    assert value(samples, "mirror_http_requests_total", route="blob", method="HEAD") == 1
    assert value(samples, "mirror_upstream_requests_total", kind="manifest") >= 1
    assert value(samples, "mirror_upstream_ratelimit_remaining") > 0
    assert value(samples, "mirror_cache_size_bytes") > 0


def missing_from(samples: Samples, exprs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{metric: [where it is used]} for every metric the expressions select without a
    sample on /metrics."""
    missing: dict[str, list[str]] = defaultdict(list)
    for where, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in sorted(names - PROMETHEUS_SERIES - samples.keys()):
            missing[name].append(where)
    return dict(missing)


async def test_dashboard_metrics_have_series_after_a_pull(
    hub: FakeHub, make_client: MakeClient
) -> None:
    client = await make_client()
    await pull_everything_once(client, hub)
    samples = await scrape(client)
    exprs = [(f"panel {title!r}", expr) for title, expr in dashboard_exprs()]
    assert len(exprs) > 20
    missing = missing_from(samples, exprs)
    # A single process has no workers to restart (tests/test_deploy.py sees a worker's).
    assert missing.pop("mirror_worker_restarts_total", None) == [
        "panel 'Worker restarts by instance'"
    ]
    assert not missing, "dashboard metrics with no sample after a pull: " + "; ".join(
        f"{name} (in {', '.join(sorted(set(where)))})" for name, where in sorted(missing.items())
    )


async def test_alert_metrics_have_series_after_a_pull(
    hub: FakeHub, make_client: MakeClient
) -> None:
    client = await make_client()
    await pull_everything_once(client, hub)
    samples = await scrape(client)
    exprs = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    assert exprs
    missing = missing_from(samples, exprs)
    # This mirror has no storage.s3, so no bucket to be up or down: the series is absent,
    # and MirrorBucketDown quiet (tests/test_deploy.py sees an S3 mirror export it).
    assert "mirror_s3_up" not in samples
    assert missing.pop("mirror_s3_up", None) == ["alert MirrorBucketDown"]
    # Nor workers: no restarts to count (tests/test_deploy.py sees a worker export it).
    assert "mirror_worker_restarts_total" not in samples
    assert missing.pop("mirror_worker_restarts_total", None) == ["alert MirrorWorkersRestarting"]
    assert not missing, "alert metrics with no sample after a pull: " + "; ".join(
        f"{name} (in {', '.join(sorted(set(where)))})" for name, where in sorted(missing.items())
    )
