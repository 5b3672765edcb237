"""The deploy/ files: every one parses, they agree with each other and with the mirror.

Metric names in the Grafana dashboard and the alert rules are checked against what a live
mirror app exports on /metrics; the rules go through `promtool check rules` and their unit
tests through `promtool test rules`; compose, Kubernetes, systemd and the Dockerfile are
parsed and their cross-references (files, volumes, ports, selectors, probes) checked.
"""

from __future__ import annotations

import configparser
import fnmatch
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from mirror.config import (
    Config,
    ConfigError,
    StorageConfig,
    UpstreamConfig,
    config_from_mapping,
    load_config,
    parse_duration,
    parse_listen,
    parse_size,
)
from mirror.config.cluster import new_secret, parse_cluster
from mirror.config.s3 import S3Config
from mirror.config.values import parse_networks
from mirror.supervisor import CLEANUP_GRACE
from mirror.web.app import create_app
from mirror.web.keys import metrics_key

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mirror.json"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_REPLICATED = DEPLOY / "kubernetes-replicated"
COMPOSE_REPLICATED = DEPLOY / "compose.replicated.yaml"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
EXAMPLES = DEPLOY / "examples"
MIRROR_PORT = 8083
# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = frozenset({"up"})
# Registries the containerd and k3s examples send through the mirror.
MIRRORED_REGISTRIES = ("docker.io", "ghcr.io", "quay.io", "registry.k8s.io")

# --- metric names --------------------------------------------------------------------------

_TYPE_LINE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (\w+)\s*$", re.MULTILINE)
_SAMPLE_NAME = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", re.MULTILINE)
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_metric_names(exposition: str) -> set[str]:
    """Series names a Prometheus text exposition can produce.

    From the `# TYPE` lines, which appear even for labelled series not used yet (with the
    suffixes their kind gets), and from the sample lines themselves.
    """
    names: set[str] = set()
    for name, kind in _TYPE_LINE.findall(exposition):
        if kind in _SUFFIXES:
            base = name
            for suffix in ("_total", "_info"):
                base = base.removesuffix(suffix)
            names.update(base + suffix for suffix in _SUFFIXES[kind])
        else:
            names.add(name)
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            match = _SAMPLE_NAME.match(line)
            if match:
                names.add(match.group(1))
    return names


_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_PROMQL_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_PROMQL_IDENT = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan", "atan2", "start", "end"}
)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords left out)."""
    text = _PROMQL_STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers (strings are gone already)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _PROMQL_GROUPING.sub(" ", text)
    text = re.sub(r"\$\{?\w+(?::\w+)?\}?", " ", text)  # Grafana variables
    names = set()
    for match in _PROMQL_IDENT.finditer(text):
        name, call = match.groups()
        if call or name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def test_promql_metric_names() -> None:
    expr = (
        'sum by (upstream, le) (rate(mirror_a_bucket{status=~"5..|error", x="a(b"}[5m]))'
        " / on (instance) group_left(upstream) mirror_b > bool 0.5e3"
        ' or histogram_quantile(0.99, mirror_c_bucket{route!~"x"}[$__rate_interval])'
        " unless absent(mirror_d offset 5m) * -Inf"
    )
    assert promql_metric_names(expr) == {
        "mirror_a_bucket",
        "mirror_b",
        "mirror_c_bucket",
        "mirror_d",
    }
    assert promql_metric_names('up{job="mirror"} == 0') == {"up"}


def test_exported_metric_names() -> None:
    text = (
        "# HELP a_total A.\n# TYPE a_total counter\n"
        '# TYPE h histogram\nh_bucket{le="+Inf"} 1.0\n'
        "# TYPE g gauge\ng 0.0\n"
    )
    assert exported_metric_names(text) == {
        "a_total", "a_created", "h_bucket", "h_sum", "h_count", "h_created", "g",
    }  # fmt: skip


def _scraped_config(tmp_path: Path, s3: S3Config | None = None) -> Config:
    return Config(
        host="127.0.0.1",
        port=0,
        # Nothing listens there; nothing in these tests asks the upstream anything.
        upstream=UpstreamConfig(url="http://127.0.0.1:9", connect_timeout=1, read_timeout=1),
        storage=StorageConfig(path=tmp_path / "data", s3=s3),
    )


async def _exposition(aiohttp_client: Any, config: Config) -> str:
    client = await aiohttp_client(create_app(config))
    resp = await client.get("/metrics")
    assert resp.status == 200
    return str(await resp.text())


@pytest.fixture
async def exported(aiohttp_client: Any, tmp_path: Path) -> set[str]:
    """Every series name a freshly started mirror exports on /metrics."""
    names = exported_metric_names(await _exposition(aiohttp_client, _scraped_config(tmp_path)))
    assert "mirror_http_requests_total" in names
    return names


@pytest.fixture
async def exported_workers(aiohttp_client: Any, tmp_path: Path) -> set[str]:
    """What a worker of `workers: 2` exports beside a single process's series: each counts
    its start as `mirror serve` does for a worker (`count_worker_start`)."""
    app = create_app(replace(_scraped_config(tmp_path), workers=2))
    app[metrics_key].count_worker_start(restarted=False)
    client = await aiohttp_client(app)
    text = await (await client.get("/metrics")).text()
    return exported_metric_names(text)


# A bucket nobody answers for: the mirror starts with it down (mirror_s3_up 0), which is
# enough to see which series a mirror with storage.s3 exports.
UNREACHABLE_S3 = S3Config(
    bucket="mirror-cache",
    endpoint="http://127.0.0.1:9",
    region="us-east-1",
    access_key_id="unused",
    secret_access_key="unused",
)


@pytest.fixture
async def exported_s3(aiohttp_client: Any, tmp_path: Path) -> set[str]:
    """Every series name a freshly started mirror with storage.s3 exports on /metrics."""
    config = _scraped_config(tmp_path, UNREACHABLE_S3)
    return exported_metric_names(await _exposition(aiohttp_client, config))


async def test_only_a_mirror_with_s3_exports_the_bucket_state(
    exported: set[str], exported_s3: set[str]
) -> None:
    """Without storage.s3 there is no bucket to be down: a 0 there would fire MirrorBucketDown."""
    assert "mirror_s3_up" not in exported
    assert "mirror_s3_up" in exported_s3
    assert exported <= exported_s3


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expression) for every query of the dashboard."""
    found = []
    for panel in _panels(json.loads(DASHBOARD.read_text())):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((panel["title"], target["expr"]))
    return found


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


async def test_dashboard_uses_only_exported_metrics(
    exported: set[str], exported_workers: set[str]
) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        unknown = names - exported - exported_workers - PROMETHEUS_SERIES
        assert not unknown, f"panel {title!r} uses metrics the mirror does not export: {unknown}"


async def test_alerts_use_only_exported_metrics(
    exported: set[str], exported_s3: set[str], exported_workers: set[str]
) -> None:
    rules = alert_rules()
    assert rules
    for rule in rules:
        names = promql_metric_names(rule["expr"])
        assert names, rule["alert"]
        unknown = names - exported - exported_s3 - exported_workers - PROMETHEUS_SERIES
        assert not unknown, f"alert {rule['alert']} uses metrics not exported: {unknown}"


def test_dashboard_covers_what_operators_look_at() -> None:
    used = set().union(*(promql_metric_names(expr) for _, expr in dashboard_exprs()))
    wanted = {
        "mirror_http_requests_total",  # request rate by status
        "mirror_http_request_duration_seconds_bucket",
        "mirror_cache_requests_total",  # hit ratio by requests
        "mirror_served_bytes_total",  # hit ratio by bytes, traffic saved
        "mirror_upstream_request_duration_seconds_bucket",  # upstream p50/p99
        "mirror_upstream_requests_total",  # upstream errors and 429s
        "mirror_upstream_ratelimit_remaining",  # Docker Hub pull budget
        "mirror_upstream_ratelimit_limit",
        "mirror_upstream_up",
        "mirror_upstream_fetches_in_flight",
        "mirror_joined_requests_total",
        "mirror_cache_size_bytes",
        "mirror_cache_max_size_bytes",  # size against its bound
        "mirror_evictions_total",
        "mirror_stale_served_total",
        "mirror_tag_revalidations_total",
        "mirror_upstream_token_fetches_total",
        "mirror_digest_mismatches_total",
        # Replicas (mirror/cluster/metrics.py). Not mirror_cluster_replica_info: it has a
        # sample only with cluster: set, and test_dashboard_metrics wants one on any mirror.
        "mirror_cluster_peer_streams_total",
        "mirror_cluster_peer_bytes_total",
        "mirror_cluster_lease_waits_total",
        "mirror_cluster_lease_takeovers_total",
        "mirror_cluster_peer_refused_total",
        "mirror_cluster_lease_unavailable_total",  # replicas working alone while Redis is down
    }
    assert wanted <= used, f"missing from the dashboard: {sorted(wanted - used)}"
    panel_text = json.dumps([expr for _, expr in dashboard_exprs()])
    assert "429" in panel_text
    assert "histogram_quantile(0.5," in panel_text
    assert "histogram_quantile(0.99," in panel_text


_BY_INSTANCE = re.compile(r"\b(?:sum|max|min|avg) by \([^)]*\binstance\b[^)]*\)")


def test_dashboard_splits_by_replica_and_sums_the_cluster() -> None:
    """Per-replica panels (split by instance) and cluster totals (summed over replicas)
    for requests, upstream fetches, peer streams and lease takeovers."""
    split: set[str] = set()
    summed: set[str] = set()
    for _, expr in dashboard_exprs():
        names = promql_metric_names(expr)
        if _BY_INSTANCE.search(expr):
            split |= names
        elif re.match(r"(?:sum|count)(?: by \((?![^)]*instance)[^)]*\))? ?\(", expr):
            summed |= names
    wanted = {
        "mirror_http_requests_total",
        "mirror_upstream_requests_total",
        "mirror_cluster_peer_streams_total",
        "mirror_cluster_lease_takeovers_total",
    }
    assert wanted <= split, f"no per-replica panel for {sorted(wanted - split)}"
    assert wanted <= summed, f"no cluster total for {sorted(wanted - summed)}"
    titles = {title for title, _ in dashboard_exprs()}
    assert {"Requests / s by replica", "Peer streams by replica"} <= titles
    rows = [p["title"] for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "row"]
    assert any(title.startswith("Replicas") for title in rows)


# --- every file parses -----------------------------------------------------------------------


def _deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes)


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(DEPLOY)) for p in paths]


YAML_FILES = _deploy_files(".yaml", ".yml")
JSON_FILES = _deploy_files(".json")
TOML_FILES = _deploy_files(".toml") + [EXAMPLES / "registries.conf"]


@pytest.mark.parametrize("path", YAML_FILES, ids=_ids(YAML_FILES))
def test_yaml_parses(path: Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs, f"{path} holds no document"
    assert all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize("path", JSON_FILES, ids=_ids(JSON_FILES))
def test_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


@pytest.mark.parametrize("path", TOML_FILES, ids=_ids(TOML_FILES))
def test_toml_parses(path: Path) -> None:
    assert tomllib.loads(path.read_text())


def test_every_deploy_file_is_checked() -> None:
    checked = set(YAML_FILES) | set(JSON_FILES) | set(TOML_FILES)
    others = {
        DEPLOY / "README.md",
        DEPLOY / "systemd" / "mirror.service",
        HAPROXY_CFG,  # haproxy -c, test_haproxy_config_is_valid
        DEPLOY / ".env",  # test_compose_project_name
    }
    unchecked = {p for p in DEPLOY.rglob("*") if p.is_file()} - checked - others
    assert not unchecked, f"files under deploy/ no test parses: {sorted(map(str, unchecked))}"


@pytest.mark.parametrize("name", ["config.example.yaml", "compose.config.yaml"])
def test_mirror_configs_load(name: str) -> None:
    config = load_config(DEPLOY / name)
    assert config.port == MIRROR_PORT
    assert config.storage.path == Path("/var/lib/mirror")


# --- Prometheus rules --------------------------------------------------------------------------


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus; make test installs it)")
    return subprocess.run(
        ["promtool", *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120
    )


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", ALERTS_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_are_complete() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    exprs = {rule["alert"]: rule["expr"] for rule in rules}
    wanted = {
        "mirror_upstream_up",  # upstream down
        "mirror_upstream_ratelimit_remaining",  # pull budget
        "mirror_cache_max_size_bytes",  # cache nearly full
        "mirror_http_requests_total",  # error rate
        "mirror_http_request_duration_seconds_bucket",  # latency
        "mirror_storage_writable",
        "mirror_metadata_up",
        "mirror_cluster_peer_refused_total",  # a replica with another secret, or a prober
        "mirror_cluster_lease_takeovers_total",  # replicas dying or stalling again and again
    }
    used = set().union(*(promql_metric_names(e) for e in exprs.values()))
    assert wanted <= used, sorted(wanted - used)
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    assert doc["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts without a firing test"
    assert names - quiet == set(), "alerts without a not-firing test"


# The cases of alerts_test.yml in which a healthy mirror of each kind makes no rule fire.
HEALTHY_SINGLE_NODE = "healthy single-node mirror"
HEALTHY_S3 = "healthy S3 mirror"
# Past the longest look-back of any rule: MirrorLeaseTakeoversFrequent's hour of 5-minute
# increases.
_LONGEST_WINDOW_MINUTES = 65
_SERIES_NAME = re.compile(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")


def _minutes(duration: str) -> float:
    match = re.fullmatch(r"(\d+)([smh])", duration)
    assert match, f"unsupported duration {duration!r}"
    return int(match.group(1)) * {"s": 1 / 60, "m": 1, "h": 60}[match.group(2)]


def _alerts_test_case(name: str) -> dict[str, Any]:
    tests: list[dict[str, Any]] = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    cases = [case for case in tests if case.get("name") == name]
    assert len(cases) == 1, f"expected one case named {name!r} in {ALERTS_TEST.name}"
    return cases[0]


async def test_healthy_mirrors_fire_no_alert(exported: set[str], exported_s3: set[str]) -> None:
    """The healthy cases feed exactly the series the rules read that a mirror of their kind
    exports (so no mirror_s3_up without S3), and expect every alert quiet past its window.
    promtool runs them in test_promtool_test_rules."""
    read = set().union(*(promql_metric_names(rule["expr"]) for rule in alert_rules()))
    alerts = {rule["alert"] for rule in alert_rules()}
    for name, exports in ((HEALTHY_SINGLE_NODE, exported), (HEALTHY_S3, exported_s3)):
        case = _alerts_test_case(name)
        fed = set()
        for series in case["input_series"]:
            match = _SERIES_NAME.match(series["series"])
            assert match, series["series"]
            fed.add(match.group(1))
        assert fed == (read & exports) | PROMETHEUS_SERIES, name
        checks = case["alert_rule_test"]
        assert all(check["exp_alerts"] == [] for check in checks), name
        late = {
            c["alertname"] for c in checks if _minutes(c["eval_time"]) >= _LONGEST_WINDOW_MINUTES
        }
        assert late == alerts, f"{name}: alerts not checked quiet late enough: {alerts - late}"


_CODE_SPAN = re.compile(r"`([^`]+)`")


def _markdown_table(text: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header line is `header`, as lists of cells."""
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:  # after the header and its --- line
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([cell.strip().replace("\\|", "|") for cell in cells])
    return rows


def test_readme_alert_table_matches_the_rules() -> None:
    """One row per rule, in the file's order: name, `for` and severity as in alerts.yml; a
    one-line expression quoted whole, a longer one described naming every metric it reads
    (and none it does not)."""
    readme = (DEPLOY / "README.md").read_text()
    rows = _markdown_table(readme, "| alert | fires when | for | severity |")
    rules = alert_rules()
    assert [row[0] for row in rows] == [f"`{rule['alert']}`" for rule in rules]
    for (_, fires_when, for_, severity), rule in zip(rows, rules, strict=True):
        name, expr = rule["alert"], rule["expr"].strip()
        assert for_ == rule.get("for", ""), name
        assert severity == rule["labels"]["severity"], name
        spans = _CODE_SPAN.findall(fires_when)
        if "\n" not in expr:
            assert spans and spans[0] == expr, f"{name}: the table does not quote {expr!r}"
        quoted = set().union(*(promql_metric_names(span) for span in spans))
        # Config keys and paths are quoted too: only what looks like a series counts.
        quoted = {m for m in quoted if m.startswith("mirror_") or m == "up"}
        assert quoted == promql_metric_names(expr), f"{name}: metrics in the table's row"


# --- Grafana ---------------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    uids = {ds["uid"] for ds in provisioned if ds["type"] == "prometheus"}
    assert variables["datasource"]["current"]["value"] in uids

    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            source = target["datasource"]
            assert source["type"] == "prometheus", panel["title"]
            assert source["uid"] in uids | {"${datasource}"}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_grafana_provisioning_matches_compose() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/mirror.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = _bind_mounts(_compose()["services"]["grafana"])
    assert mounts[path] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    url = urlsplit(datasources[0]["url"])
    assert url.hostname == "prometheus" and url.port == 9090


# --- compose ---------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def _volume_entries(service: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(type, source, target) of each volume of a compose service."""
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            yield entry["type"], entry.get("source", ""), entry["target"]
            continue
        source, _, rest = entry.partition(":")
        target = rest.split(":")[0]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        yield kind, source, target


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """target → the file or directory in the repository it mounts."""
    return {
        target: (DEPLOY / source).resolve()
        for kind, source, target in _volume_entries(service)
        if kind == "bind"
    }


def _published_ports(service: dict[str, Any]) -> dict[int, int]:
    """container port → host port."""
    ports = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports[int(entry["target"])] = int(entry["published"])
            continue
        match = re.search(r"(\d+):(\d+)(?:/\w+)?$", str(entry))
        assert match, f"unparsed port {entry!r}"
        ports[int(match.group(2))] = int(match.group(1))
    return ports


def test_compose_services_ports_and_healthchecks() -> None:
    services = _compose()["services"]
    assert {"mirror", "redis", "prometheus", "grafana"} <= set(services)
    assert _published_ports(services["mirror"]) == {8083: 8083}
    assert _published_ports(services["prometheus"]) == {9090: 9090}
    assert _published_ports(services["grafana"]) == {3000: 3000}
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name


def test_compose_volumes_and_mounted_files_exist() -> None:
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for kind, source, target in _volume_entries(service):
            assert target.startswith("/"), f"{name}: {target}"
            if kind == "volume":
                used.add(source)
                assert source in declared, f"{name} uses undeclared volume {source!r}"
            elif kind == "bind":
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{name} mounts {source}, which is not in the repository"
                assert path.is_relative_to(REPO_ROOT), f"{name} mounts {source} from outside"
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_compose_project_name() -> None:
    # docker-compose 1.29 (Debian 12's) rejects a top-level `name:`; both it and compose v2
    # read the project directory's .env, so the volumes stay mirror_mirror-data etc.
    assert "name" not in _compose()
    lines = (DEPLOY / ".env").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert env == {"COMPOSE_PROJECT_NAME": "mirror"}


def test_compose_builds_the_mirror_from_the_dockerfile() -> None:
    build = _compose()["services"]["mirror"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO_ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).is_file()


def test_compose_mirror_config_is_wired() -> None:
    services = _compose()["services"]
    mirror = services["mirror"]
    env = mirror["environment"]
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    config_path = env["MIRROR_CONFIG"]
    mounts = _bind_mounts(mirror)
    config = load_config(mounts[config_path])
    assert config.port == MIRROR_PORT
    volumes = {target for kind, _, target in _volume_entries(mirror) if kind == "volume"}
    assert str(config.storage.path) in volumes, "the cache is not on a named volume"
    assert config.redis.url is not None
    assert urlsplit(config.redis.url).hostname in services
    assert mirror["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_prometheus_scrapes_the_mirror_with_the_rules() -> None:
    prometheus = _compose()["services"]["prometheus"]
    mounts = _bind_mounts(prometheus)
    config_file = mounts["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_file.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["mirror"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"mirror:{MIRROR_PORT}"]
    assert jobs["mirror"].get("metrics_path", "/metrics") == "/metrics"
    for rule_file in config["rule_files"]:
        in_container = str(Path("/etc/prometheus") / rule_file)
        assert in_container in mounts, f"{rule_file} is not mounted next to prometheus.yml"
        assert mounts[in_container] == ALERTS


# --- Kubernetes ------------------------------------------------------------------------------


def _k8s_docs(directory: Path = KUBERNETES) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _one(kind: str, name: str | None = None, directory: Path = KUBERNETES) -> dict[str, Any]:
    docs = _k8s_docs(directory)
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    assert port in named, f"no container port named {port!r}"
    return int(named[port])


def test_kubernetes_docs_are_named_and_namespace_less() -> None:
    docs = _k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {
        "StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "ServiceMonitor",
    } <= kinds  # fmt: skip
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
    assert _one("ServiceMonitor")["apiVersion"] == "monitoring.coreos.com/v1"


def test_kustomization_lists_every_file() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == files


def test_statefulset_probes_hit_the_service_port() -> None:
    sts = _one("StatefulSet", "mirror")
    assert sts["spec"]["replicas"] == 1
    pod = sts["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    live = container["livenessProbe"]["httpGet"]
    ready = container["readinessProbe"]["httpGet"]
    assert live["path"] == "/healthz"
    assert ready["path"] == "/healthz"  # test_no_readiness_probe_asks_readyz says why
    service = _one("Service", "mirror")
    (port,) = service["spec"]["ports"]
    assert port["port"] == MIRROR_PORT
    target = _container_port(container, port.get("targetPort", port["port"]))
    assert target == MIRROR_PORT
    assert _container_port(container, live["port"]) == target
    assert _container_port(container, ready["port"]) == target


def test_kubernetes_selectors_match_the_pods() -> None:
    sts = _one("StatefulSet", "mirror")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert _matches(sts["spec"]["selector"]["matchLabels"], pod_labels)
    service = _one("Service", "mirror")
    assert _matches(service["spec"]["selector"], pod_labels)
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    pdb = _one("PodDisruptionBudget")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    monitor = _one("ServiceMonitor")
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"
    # Every other Service selects the pods of a workload in the set.
    workloads = [d for d in _k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in (d for d in _k8s_docs() if d["kind"] == "Service"):
        assert any(
            _matches(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
            for w in workloads
        ), svc["metadata"]["name"]


def test_statefulset_references_exist_and_config_is_valid() -> None:
    sts = _one("StatefulSet", "mirror")
    spec = sts["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    names = {(d["kind"], d["metadata"]["name"]) for d in _k8s_docs()}
    referenced = set()
    for volume in volumes.values():
        if "configMap" in volume:
            referenced.add(("ConfigMap", volume["configMap"]["name"]))
        if "secret" in volume:
            referenced.add(("Secret", volume["secret"]["secretName"]))
    for source in container.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                referenced.add((kind, source[key]["name"]))
    assert {kind for kind, _ in referenced} == {"ConfigMap", "Secret"}
    assert referenced <= names, f"missing: {referenced - names}"

    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for mount in mounts.values():
        assert mount["name"] in volumes or mount["name"] in claims, mount["name"]
    assert mounts["/var/lib/mirror"]["name"] in claims

    # The mirror reads the ConfigMap's config.yaml where its args say.
    args = container.get("args", [])
    config_path = args[args.index("--config") + 1]
    config_mount = mounts[config_path]
    config_map = _one("ConfigMap", volumes[config_mount["name"]]["configMap"]["name"])
    config = config_from_mapping(yaml.safe_load(config_map["data"][config_mount["subPath"]]))
    assert str(config.storage.path) == "/var/lib/mirror"
    assert config.port == _container_port(container, "http")
    if config.redis.url:
        assert ("Service", urlsplit(config.redis.url).hostname) in names


def test_kubernetes_pods_are_locked_down() -> None:
    workloads = [d for d in _k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]
    assert workloads
    for workload in workloads:
        spec = workload["spec"]["template"]["spec"]
        for container in spec["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            security = container["securityContext"]
            non_root = security.get("runAsNonRoot", spec["securityContext"].get("runAsNonRoot"))
            assert non_root is True, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert container["resources"]["requests"], where
            assert container["resources"]["limits"]["memory"], where


# --- Kubernetes: every kustomization, rendered --------------------------------------------

KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.glob("*/kustomization.yaml"))
# storage.max_size leaves this much of the cache's volume free: eviction starts only once
# the cache passes the bound, and downloads under way (tmp/) and the metadata snapshot live
# on the same volume. The larger of 15% and 2 GiB.
HEADROOM_FRACTION = 0.15
HEADROOM_MIN = 2 * 1024**3


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge as kustomize does it for these files: mappings key by key, lists
    of named items (containers, volumes, ports, mounts) item by name, new items first, and
    anything else replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in patch.items()}}
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(i, dict) and "name" in i for i in [*base, *patch]):
        changes = {item["name"]: item for item in patch}
        known = {item["name"] for item in base}
        added = [item for item in patch if item["name"] not in known]
        return added + [_merge(item, changes.get(item["name"], {})) for item in base]
    return patch


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize directory` renders (resources, then patches)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            docs += _kustomize(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        change = yaml.safe_load((directory / patch["path"]).read_text())
        (i,) = [
            i
            for i, d in enumerate(docs)
            if (d["kind"], d["metadata"]["name"]) == (change["kind"], change["metadata"]["name"])
        ]
        docs[i] = _merge(docs[i], change)
    return docs


def _named(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _rendered(docs: list[dict[str, Any]], kind: str, name: str = "mirror") -> dict[str, Any]:
    (found,) = [d for d in docs if (d["kind"], d["metadata"]["name"]) == (kind, name)]
    return found


def _mirror_workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (workload,) = [
        d
        for d in docs
        if d["kind"] in ("StatefulSet", "Deployment") and d["metadata"]["name"] == "mirror"
    ]
    return workload


def _mirror_raw_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mirror's config file, as the workload mounts it from its ConfigMap."""
    spec = _mirror_workload(docs)["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "mirror"]
    args = container["args"]
    mount = {m["mountPath"]: m for m in container["volumeMounts"]}[args[args.index("--config") + 1]]
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    config_map = _rendered(docs, "ConfigMap", volume["configMap"]["name"])
    raw: dict[str, Any] = yaml.safe_load(config_map["data"][mount["subPath"]])
    return raw


def _cache_volume_bytes(docs: list[dict[str, Any]], path: str) -> int:
    """The size of the volume mounted at `path`: a claim template's request, or an
    emptyDir's sizeLimit."""
    workload = _mirror_workload(docs)
    spec = workload["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "mirror"]
    name = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[path]
    claims = {c["metadata"]["name"]: c for c in workload["spec"].get("volumeClaimTemplates", [])}
    if name in claims:
        size = claims[name]["spec"]["resources"]["requests"]["storage"]
    else:
        size = {v["name"]: v for v in spec["volumes"]}[name]["emptyDir"]["sizeLimit"]
    return parse_size(f"{path} volume", size + "B")  # 50Gi → 50GiB


def test_every_kustomization_is_one_of_the_known_sets() -> None:
    assert KUSTOMIZATIONS == [KUBERNETES, KUBERNETES_REPLICATED, DEPLOY / "kubernetes-tls"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_max_size_stays_under_the_cache_volume(directory: Path) -> None:
    docs = _kustomize(directory)
    raw = _mirror_raw_config(docs)
    storage = raw["storage"]
    assert storage.get("max_size"), f"{directory.name}: storage.max_size unset (unbounded)"
    bound = parse_size("storage.max_size", storage["max_size"])
    volume = _cache_volume_bytes(docs, storage["path"])
    headroom = max(HEADROOM_FRACTION * volume, HEADROOM_MIN)
    assert bound <= volume - headroom, (
        f"{directory.name}: storage.max_size {storage['max_size']} leaves less than "
        f"{headroom / 1024**3:.1f} GiB of the {volume / 1024**3:.0f} GiB volume free"
    )


COMPOSE_CONFIGS = [DEPLOY / "compose.config.yaml", DEPLOY / "compose.replicated.config.yaml"]


@pytest.mark.parametrize("path", COMPOSE_CONFIGS, ids=_ids(COMPOSE_CONFIGS))
def test_compose_caches_are_bounded(path: Path) -> None:
    """Compose's volumes have no size of their own: they fill the host's disk under
    /var/lib/docker unless the mirror bounds its cache, local tier and bucket alike."""
    storage = yaml.safe_load(path.read_text())["storage"]
    tiers = {"storage": storage} | ({"storage.s3": storage["s3"]} if "s3" in storage else {})
    for key, tier in tiers.items():
        assert tier.get("max_size"), f"{path.name}: {key}.max_size unset (unbounded)"
        assert parse_size(f"{key}.max_size", tier["max_size"]) > 0


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_a_start_on_a_large_cache_is_not_killed_by_the_liveness_probe(directory: Path) -> None:
    """The cache is scanned before /healthz answers: a startup probe gives it 10 minutes,
    where the liveness probe alone killed a pod after 35 s."""
    workloads = [d for d in _kustomize(directory) if d["kind"] in ("Deployment", "StatefulSet")]
    mirrors = [
        (workload["metadata"]["name"], container)
        for workload in workloads
        for container in workload["spec"]["template"]["spec"]["containers"]
        if container["name"].startswith("mirror")
    ]
    assert mirrors
    for name, container in mirrors:
        startup = container.get("startupProbe")
        assert startup is not None, f"{directory.name}: {name}"
        assert startup["httpGet"]["path"] == "/healthz"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_no_readiness_probe_asks_readyz(directory: Path) -> None:
    """/readyz answers 503 while Redis, the bucket or the volume fails, though the mirror
    still serves: as a readiness probe it would take the pods out of the Service together
    (the one pod of a single-replica set whenever its Redis restarts), and the nodes would
    pull from the upstream. A terminating pod leaves the Service without it."""
    workloads = [d for d in _kustomize(directory) if d["kind"] in ("Deployment", "StatefulSet")]
    assert workloads
    for workload in workloads:
        for container in workload["spec"]["template"]["spec"]["containers"]:
            probe = container.get("readinessProbe", {}).get("httpGet", {})
            where = f"{directory.name}: {workload['metadata']['name']}/{container['name']}"
            assert probe.get("path") != "/readyz", where


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_nodes_hosts_toml_points_at_the_service_cluster_ip(directory: Path) -> None:
    """Nodes' containerd cannot resolve Service names: the set's hosts.toml for the nodes
    names the Service's fixed clusterIP and one of its ports, with the matching scheme."""
    docs = _kustomize(directory)
    service = _rendered(docs, "Service")
    cluster_ip = ipaddress.ip_address(service["spec"]["clusterIP"])
    # kubeadm's default Service CIDR, in the band the API server keeps for fixed addresses.
    assert cluster_ip in ipaddress.ip_network("10.96.0.0/24"), cluster_ip
    hosts = tomllib.loads((directory / "nodes/certs.d/docker.io/hosts.toml").read_text())
    assert hosts["server"] == "https://registry-1.docker.io"
    (url,) = hosts["host"]
    parts = urlsplit(url)
    assert parts.hostname == str(cluster_ip), url
    ports = {p["port"]: p["name"] for p in service["spec"]["ports"]}
    assert parts.port in ports, f"{url}: no such port on the Service"
    assert parts.scheme == ports[parts.port], f"{url}: the Service's port is {ports[parts.port]}"
    host = hosts["host"][url]
    assert host["capabilities"] == ["pull", "resolve"]
    if parts.scheme == "https":
        assert Path(host["ca"]).parent == Path("/etc/containerd/certs.d/docker.io")
    # The mirror serves that port: the container's port of the same name.
    spec = _mirror_workload(docs)["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "mirror"]
    target = {p["port"]: p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}
    listen = _mirror_raw_config(docs)
    listener = listen["tls"]["listen"] if parts.scheme == "https" else listen["listen"]
    assert _container_port(container, target[parts.port]) == parse_listen("listen", listener)[1]


def test_kubectl_kustomize_renders_as_parsed() -> None:
    """The renderer above agrees with kubectl's own kustomize on every set."""
    if shutil.which("kubectl") is None:
        pytest.skip("needs kubectl (kustomize)")
    for directory in KUSTOMIZATIONS:
        rendered = subprocess.run(
            ["kubectl", "kustomize", str(directory)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        ours = {_named(d): d for d in _kustomize(directory)}
        assert {_named(d): d for d in docs} == ours, directory.name


# --- Dockerfile ------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    instructions = []
    pending = ""
    for raw in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends in a continuation"
    return instructions


def _dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` (relative to the context) out: last match wins."""
    ignored = False
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        hit = fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*")
        if hit:
            ignored = not negate
    return ignored


def test_dockerfile() -> None:
    instructions = _dockerfile()
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert len(froms) >= 2, "not a multi-stage build"
    # The base is a build argument, the official slim Python image unless given.
    assert ("ARG", "BASE=python:3.11-slim") in instructions
    assert all(args.split()[0] == "${BASE}" for args in froms)
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    final = instructions[last_from:]
    kinds = {kw: args for kw, args in final}

    users = [args for kw, args in final if kw == "USER"]
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert "8083" in kinds["EXPOSE"].split()
    assert "/var/lib/mirror" in kinds["VOLUME"]
    # /healthz, asked by mirror.healthcheck (tests/test_healthcheck.py) on the listen port.
    assert "mirror.healthcheck" in kinds["HEALTHCHECK"]
    assert "CMD" in kinds["HEALTHCHECK"].split()
    assert "curl" not in kinds["HEALTHCHECK"]  # not in the slim image
    assert json.loads(kinds["ENTRYPOINT"]) == ["mirror"]
    assert json.loads(kinds["CMD"]) == ["serve", "--config", "/etc/mirror/config.yaml"]

    # Everything COPY takes from the context exists and is not excluded by .dockerignore.
    copied = {}
    for kw, args in instructions:
        if kw not in ("COPY", "ADD") or "--from=" in args:
            continue
        *sources, dest = [a for a in shlex.split(args) if not a.startswith("--")]
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
            if source != ".":  # the whole context: what .dockerignore lets through
                assert not _dockerignored(source), f"COPY {source}: excluded by .dockerignore"
            copied[dest] = REPO_ROOT / source
    # The image's default config is valid and caches into the volume.
    config = load_config(copied["/etc/mirror/config.yaml"])
    assert str(config.storage.path) == "/var/lib/mirror"
    assert config.port == 8083


def test_dockerignore() -> None:
    ignored = (".git", ".venv", "mirror-data", "bench-results", "tests", ".venv/bin/python")
    ignored += ("docs", "deploy/compose.yaml", "mirror/__pycache__", "mirror/x.pyc", "a.egg-info")
    for path in ignored:
        assert _dockerignored(path), path
    # What the build stage's `COPY . .` needs, and an offline build's wheelhouse.
    needed = ("pyproject.toml", "README.md", "mirror", "mirror/cli.py")
    for path in (*needed, "deploy/config.example.yaml", "wheels", "wheels/a.whl"):
        assert not _dockerignored(path), path


# --- systemd ---------------------------------------------------------------------------------


def test_systemd_unit() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / "mirror.service")
    service = parser["Service"]
    exec_start = shlex.split(service["ExecStart"])
    assert exec_start[0] == "/usr/local/bin/mirror"
    assert "mirror serve" in service["ExecStart"]
    assert exec_start[exec_start.index("--config") + 1] == "/etc/mirror/config.yaml"
    assert service["Restart"] == "on-failure"
    # A config error (exit 2) is not restarted every RestartSec for ever.
    assert "2" in service["RestartPreventExitStatus"].split()
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["StateDirectory"] == "mirror"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/mirror" in service["ReadWritePaths"].split()
    assert service["NoNewPrivileges"] == "yes"
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def _pip_installs(text: str) -> list[list[str]]:
    """The arguments after `pip install` of each such command in `text` (comments and
    shell prompts around them dropped)."""
    installs = []
    for line in text.splitlines():
        for command in line.lstrip("# ").split("  #", 1)[0].split("&&"):
            words = shlex.split(command) if "pip install" in command else []
            if words and words[0].endswith("/pip") and words[1] == "install":
                installs.append(words[2:])
    return installs


def _readme_section(title: str) -> str:
    text = (DEPLOY / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("where", ["systemd/mirror.service", "README.md"])
def test_systemd_install_takes_the_lock(where: str) -> None:
    """As the Dockerfile and the Makefile do: the dependencies from the lock with their
    hashes checked, then the project alone, its build backend from the lock too."""
    text = (DEPLOY / where).read_text()
    if where == "README.md":
        text = _readme_section("systemd")
    installs = _pip_installs(text)
    assert installs, f"{where}: no pip install"
    locked = [args for args in installs if "-r" in args]
    assert locked == [["--require-hashes", "-r", "requirements/runtime.txt"]], where
    assert (REPO_ROOT / "requirements" / "runtime.txt").is_file()
    (project,) = [args for args in installs if "." in args]
    assert {"--no-deps", "--no-build-isolation"} <= set(project), where
    assert len(installs) == 2, f"{where}: another pip install: {installs}"


# --- client examples -------------------------------------------------------------------------


def _mirror_url() -> str:
    daemon = json.loads((EXAMPLES / "daemon.json").read_text())
    (url,) = daemon["registry-mirrors"]
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.port == MIRROR_PORT
    if parts.scheme == "http":
        assert parts.netloc in daemon["insecure-registries"]
    return str(url)


@pytest.mark.parametrize("registry", MIRRORED_REGISTRIES)
def test_containerd_hosts_toml(registry: str) -> None:
    hosts = tomllib.loads((EXAMPLES / "certs.d" / registry / "hosts.toml").read_text())
    server = urlsplit(hosts["server"])
    assert server.scheme == "https"
    expected = "registry-1.docker.io" if registry == "docker.io" else registry
    assert server.hostname == expected
    assert list(hosts["host"]) == [_mirror_url()]
    assert hosts["host"][_mirror_url()]["capabilities"] == ["pull", "resolve"]


def test_only_the_four_registries_have_hosts_toml() -> None:
    dirs = {p.name for p in (EXAMPLES / "certs.d").iterdir()}
    assert dirs == set(MIRRORED_REGISTRIES)


def test_podman_registries_conf() -> None:
    conf = tomllib.loads((EXAMPLES / "registries.conf").read_text())
    (hub,) = [r for r in conf["registry"] if r["location"] == "docker.io"]
    (mirror,) = hub["mirror"]
    assert f"http://{mirror['location']}" == _mirror_url()
    assert mirror["insecure"] is True


def test_k3s_registries_yaml() -> None:
    doc = yaml.safe_load((EXAMPLES / "registries.yaml").read_text())
    assert set(doc["mirrors"]) == set(MIRRORED_REGISTRIES)
    for registry, entry in doc["mirrors"].items():
        assert entry["endpoint"] == [_mirror_url()], registry


# --- replicas: kubernetes-replicated/, compose.replicated.yaml, haproxy ----------------------

_ENV_REF = re.compile(r"\$\{(\w+)\}")


def _replicated_docs() -> list[dict[str, Any]]:
    return _k8s_docs(KUBERNETES_REPLICATED)


def _replicated(kind: str, name: str | None = None) -> dict[str, Any]:
    return _one(kind, name, KUBERNETES_REPLICATED)


def _replicated_pod() -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, its one container) of the replicated Deployment."""
    spec = _replicated("Deployment", "mirror")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def _replicated_config_text() -> tuple[str, str]:
    """(config file text, the path it is mounted at) of the replicated Deployment."""
    spec, container = _replicated_pod()
    args = container["args"]
    config_path = args[args.index("--config") + 1]
    mount = {m["mountPath"]: m for m in container["volumeMounts"]}[config_path]
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    config_map = _replicated("ConfigMap", volume["configMap"]["name"])
    return config_map["data"][mount["subPath"]], config_path


def _with_secret_files(raw: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """`raw` with cluster.secret_file pointing at a generated secret in tmp_path."""
    secret = tmp_path / "cluster-secret"
    secret.write_text(new_secret() + "\n")
    return {**raw, "cluster": {**raw["cluster"], "secret_file": str(secret)}}


def test_replicated_kubernetes_set_is_named_and_namespace_less() -> None:
    docs = _replicated_docs()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["Deployment", "Service", "ConfigMap", "Secret", "Secret", "PodDisruptionBudget",
         "ServiceMonitor"]
    )  # fmt: skip
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
    kustomization = yaml.safe_load((KUBERNETES_REPLICATED / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    files = {p.name for p in KUBERNETES_REPLICATED.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == files
    # The same Service name as the single-node set: the scrape job stays "mirror".
    assert _replicated("Service")["metadata"]["name"] == "mirror"


def test_replicated_deployment_selectors_service_and_budget() -> None:
    deployment = _replicated("Deployment", "mirror")
    replicas = deployment["spec"]["replicas"]
    assert replicas == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = _replicated("Service", "mirror")
    assert _matches(service["spec"]["selector"], pod_labels)
    # Any replica answers any request: no stickiness.
    assert service["spec"].get("sessionAffinity", "None") == "None"
    pdb = _replicated("PodDisruptionBudget")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    # One replica at a time; with minAvailable a scaled-down set could never be drained.
    assert pdb["spec"] == {**pdb["spec"], "maxUnavailable": 1}
    assert "minAvailable" not in pdb["spec"]
    monitor = _replicated("ServiceMonitor")
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert any(_matches(c["labelSelector"]["matchLabels"], pod_labels) for c in spread)


def test_replicated_probes_hit_the_service_port() -> None:
    _, container = _replicated_pod()
    live = container["livenessProbe"]["httpGet"]
    ready = container["readinessProbe"]["httpGet"]
    assert live["path"] == "/healthz"
    # Not /readyz: it fails on every replica together when the bucket or Redis is down,
    # which would leave the Service without endpoints while each replica can still serve.
    assert ready["path"] == "/healthz"
    (port,) = _replicated("Service", "mirror")["spec"]["ports"]
    target = _container_port(container, port.get("targetPort", port["port"]))
    assert port["port"] == target == MIRROR_PORT
    assert _container_port(container, live["port"]) == target
    assert _container_port(container, ready["port"]) == target


def test_replicated_deployment_references_exist() -> None:
    spec, container = _replicated_pod()
    volumes = {v["name"]: v for v in spec["volumes"]}
    names = {(d["kind"], d["metadata"]["name"]) for d in _replicated_docs()}
    referenced = set()
    for volume in volumes.values():
        if "configMap" in volume:
            referenced.add(("ConfigMap", volume["configMap"]["name"]))
        if "secret" in volume:
            referenced.add(("Secret", volume["secret"]["secretName"]))
    for source in container.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                referenced.add((kind, source[key]["name"]))
    assert referenced == {(kind, name) for kind, name in names if kind in ("ConfigMap", "Secret")}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for mount in mounts.values():
        assert mount["name"] in volumes, mount["name"]
    # The local tier is per replica and disposable: an emptyDir, bounded.
    local = volumes[mounts["/var/lib/mirror"]["name"]]
    assert "sizeLimit" in local["emptyDir"]


def test_replicated_config_takes_the_pod_ip_and_the_cluster_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, container = _replicated_pod()
    text, _ = _replicated_config_text()
    raw = yaml.safe_load(text)
    # Every ${VAR} of the config is set in the container, from the downward API.
    env = {e["name"]: e for e in container["env"]}
    assert set(_ENV_REF.findall(text)) <= set(env)
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert raw["cluster"]["advertise_url"] == f"http://${{POD_IP}}:{MIRROR_PORT}"
    # cluster.secret_file is the key of the mirror-cluster Secret, mounted as a directory.
    secret_file = Path(raw["cluster"]["secret_file"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts[str(secret_file.parent)]
    assert "subPath" not in mount
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    secret = _replicated("Secret", volume["secret"]["secretName"])
    assert secret_file.name in secret["stringData"]
    monkeypatch.setenv("POD_IP", "10.42.1.7")
    monkeypatch.setenv("POD_NAME", "mirror-5f7c9-abcde")
    # The placeholder is too short to be accepted: a forgotten Secret stops the replica.
    placeholder = tmp_path / "placeholder"
    placeholder.write_text(secret["stringData"][secret_file.name])
    with pytest.raises(ConfigError) as raised:
        parse_cluster({"cluster": {**raw["cluster"], "secret_file": str(placeholder)}})
    assert raised.value.key == "cluster.secret_file"
    cluster = parse_cluster(_with_secret_files(raw, tmp_path))
    assert cluster is not None
    assert cluster.advertise_url == f"http://10.42.1.7:{MIRROR_PORT}"
    assert cluster.replica_id == "mirror-5f7c9-abcde"
    assert cluster.lease_ttl == 10


def test_replicated_config_shares_the_bucket_and_redis() -> None:
    _, container = _replicated_pod()
    raw = yaml.safe_load(_replicated_config_text()[0])
    s3 = raw["storage"]["s3"]
    assert s3["bucket"] and urlsplit(s3["endpoint"]).scheme in ("http", "https")
    # Credentials come from the Secret's AWS_* variables, never from the ConfigMap.
    assert not {"access_key_id", "secret_access_key", "secret_access_key_file"} & set(s3)
    (source,) = container["envFrom"]
    s3_secret = _replicated("Secret", source["secretRef"]["name"])
    assert set(s3_secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for value in s3_secret["stringData"].values():
        assert value.startswith("REPLACE-"), "a credential that looks real"
    # The Sentinel form, as the replicated set shows it.
    assert raw["redis"]["url"].startswith("redis+sentinel://")
    # The local tier's bound stays under the emptyDir's limit.
    spec, _ = _replicated_pod()
    (local,) = [v for v in spec["volumes"] if v["name"] == "local-tier"]
    limit = parse_size("sizeLimit", local["emptyDir"]["sizeLimit"] + "B")
    assert parse_size("storage.max_size", raw["storage"]["max_size"]) < limit


def test_replicated_configmap_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, container = _replicated_pod()
    monkeypatch.setenv("POD_IP", "10.42.1.7")
    monkeypatch.setenv("POD_NAME", "mirror-5f7c9-abcde")
    raw = yaml.safe_load(_replicated_config_text()[0])
    config = config_from_mapping(_with_secret_files(raw, tmp_path))
    assert config.storage.s3 is not None and config.cluster is not None
    assert config.port == _container_port(container, "http")
    assert str(config.storage.path) == "/var/lib/mirror"
    assert config.storage.s3.bucket == "mirror-cache"
    assert config.cluster.advertise_url == f"http://10.42.1.7:{MIRROR_PORT}"


def test_replicated_config_says_what_ipv6_pods_listen_on() -> None:
    """0.0.0.0 takes no IPv6 connection: a pod on an IPv6 address advertised in brackets
    would refuse its peers, the kubelet's probes and every client. The hint says both."""
    text, _ = _replicated_config_text()
    hints = " ".join(line for line in text.splitlines() if "IPv6 pods:" in line)
    assert "http://[${POD_IP}]:8083" in hints
    listen = re.search(r"listen: ('[^']*')", hints)
    assert listen, "the IPv6 hint names no listen"
    value = yaml.safe_load(f"listen: {listen.group(1)}")["listen"]
    host, port = parse_listen("listen", value)
    assert ipaddress.ip_address(host) == ipaddress.ip_address("::") and port == MIRROR_PORT


def test_kubernetes_replicated_pods_are_locked_down() -> None:
    spec, container = _replicated_pod()
    security = container["securityContext"]
    assert security.get("runAsNonRoot", spec["securityContext"].get("runAsNonRoot")) is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert spec["automountServiceAccountToken"] is False


# compose.replicated.yaml


def _compose_replicated() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_REPLICATED.read_text())
    assert isinstance(doc, dict)
    return doc


def _mirror_services() -> dict[str, dict[str, Any]]:
    services = _compose_replicated()["services"]
    return {name: s for name, s in services.items() if s.get("image") == "mirror:local"}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_replicated_services_ports_and_healthchecks() -> None:
    services = _compose_replicated()["services"]
    assert set(_mirror_services()) == {"mirror-1", "mirror-2", "mirror-3"}
    assert {"lb", "redis", "s3"} <= set(services)
    assert _published_ports(services["lb"]) == {MIRROR_PORT: MIRROR_PORT}
    for name, service in services.items():
        if name != "lb":
            assert not _published_ports(service), f"{name}: only the load balancer publishes"
        if service.get("restart") == "no":
            continue  # a one-shot job (the bucket's creation)
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    for name, mirror in _mirror_services().items():
        build = mirror["build"]
        assert (DEPLOY / build["context"]).resolve() == REPO_ROOT, name
        assert mirror["depends_on"]["redis"]["condition"] == "service_healthy"
        assert mirror["read_only"] is True


def test_compose_replicated_volumes_secrets_and_mounted_files() -> None:
    compose = _compose_replicated()
    declared = set(compose.get("volumes") or {})
    used = set()
    local_tiers = set()
    for name, service in compose["services"].items():
        for kind, source, target in _volume_entries(service):
            if kind == "volume":
                used.add(source)
                if target == "/var/lib/mirror":
                    local_tiers.add(source)
            elif kind == "bind":
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{name} mounts {source}, which is not in the repository"
    assert used == declared
    assert len(local_tiers) == len(_mirror_services()), "replicas share a local tier"
    # The cluster secret is a file the operator generates, which git never takes.
    (secret,) = compose["secrets"].values()
    path = (DEPLOY / secret["file"]).resolve()
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(path)], cwd=REPO_ROOT, check=False
    ).returncode
    assert ignored == 0, f"{secret['file']} is not in .gitignore"
    for name, mirror in _mirror_services().items():
        assert mirror["secrets"] == list(compose["secrets"]), name


def test_compose_replicated_ships_no_credentials() -> None:
    for name, service in _compose_replicated()["services"].items():
        for key, value in _environment(service).items():
            if re.search(r"KEY|SECRET|PASSWORD|USER", key) and "ADVERTISE" not in key:
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), f"{name}: {key}={value!r}"


def _compose_replicated_raw_config(service: dict[str, Any]) -> dict[str, Any]:
    env = _environment(service)
    raw = yaml.safe_load(_bind_mounts(service)[env["MIRROR_CONFIG"]].read_text())
    assert isinstance(raw, dict)
    return raw


def test_compose_replicated_config_is_wired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = _compose_replicated()
    services = compose["services"]
    secret_name = next(iter(compose["secrets"]))
    for name, mirror in _mirror_services().items():
        raw = _compose_replicated_raw_config(mirror)
        assert urlsplit(raw["redis"]["url"]).hostname in services
        assert urlsplit(raw["storage"]["s3"]["endpoint"]).hostname in services
        assert raw["cluster"]["secret_file"] == f"/run/secrets/{secret_name}"
        volumes = {t for kind, _, t in _volume_entries(mirror) if kind == "volume"}
        assert raw["storage"]["path"] in volumes
        # Each replica advertises its own service name, which the others resolve.
        env = _environment(mirror)
        assert set(_ENV_REF.findall(yaml.safe_dump(raw))) <= set(env)
        for var in _ENV_REF.findall(raw["cluster"]["advertise_url"]):
            monkeypatch.setenv(var, env[var])
        cluster = parse_cluster(_with_secret_files(raw, tmp_path))
        assert cluster is not None
        assert cluster.advertise_url == f"http://{name}:{MIRROR_PORT}"


def test_compose_replicated_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, mirror in _mirror_services().items():
        monkeypatch.setenv("ADVERTISE_HOST", _environment(mirror)["ADVERTISE_HOST"])
        raw = _compose_replicated_raw_config(mirror)
        config = config_from_mapping(_with_secret_files(raw, tmp_path))
        assert config.storage.s3 is not None and config.cluster is not None
        assert config.port == MIRROR_PORT
        assert config.storage.s3.bucket == "mirror-cache"
        assert config.cluster.advertise_url == f"http://{name}:{MIRROR_PORT}"


# haproxy


def _haproxy_sections() -> dict[str, list[list[str]]]:
    """'backend mirrors' → its lines, split into words (comments dropped)."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for raw in HAPROXY_CFG.read_text().splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if not raw[0].isspace():
            current = sections.setdefault(" ".join(words), [])
        else:
            current.append(words)
    return sections


def test_haproxy_round_robins_over_the_replicas_without_stickiness() -> None:
    sections = _haproxy_sections()
    lb = _compose_replicated()["services"]["lb"]
    assert _bind_mounts(lb)["/usr/local/etc/haproxy/haproxy.cfg"] == HAPROXY_CFG
    (frontend,) = [s for name, s in sections.items() if name == "frontend registry"]
    assert ["bind", f":{MIRROR_PORT}"] in frontend
    backend = sections["backend mirrors"]
    assert ["default_backend", "mirrors"] in frontend
    assert ["balance", "roundrobin"] in backend
    words = {w for line in backend for w in line}
    assert not words & {"stick", "stick-table", "cookie", "hash-type", "source"}
    assert ["http-check", "send", "meth", "GET", "uri", "/healthz"] in backend
    servers = {line[1]: line[2] for line in backend if line[0] == "server"}
    assert servers == {name: f"{name}:{MIRROR_PORT}" for name in _mirror_services()}
    defaults = next(line for line in backend if line[0] == "default-server")
    assert "check" in defaults


def test_haproxy_forwards_the_client_address_it_saw() -> None:
    """`option forwardfor`, and proxy headers from clients dropped first: the replicas
    believe haproxy's X-Forwarded-For (every line of it, in order, read as one list)."""
    (frontend,) = [s for name, s in _haproxy_sections().items() if name == "frontend registry"]
    assert ["option", "forwardfor"] in frontend
    for header in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"):
        assert ["http-request", "del-header", header] in frontend, header


def test_compose_replicas_trust_the_load_balancer_alone() -> None:
    """Each replica's trusted_proxies names the lb service's fixed address, in the
    network's subnet but outside the range other containers are given addresses from."""
    compose = _compose_replicated()
    (pool,) = compose["networks"]["default"]["ipam"]["config"]
    subnet, others = ipaddress.ip_network(pool["subnet"]), ipaddress.ip_network(pool["ip_range"])
    lb = ipaddress.ip_address(compose["services"]["lb"]["networks"]["default"]["ipv4_address"])
    assert lb in subnet and lb not in others
    for name, service in compose["services"].items():
        if name != "lb":
            assert "networks" not in service, f"{name}: only the load balancer is fixed"
    for name, mirror in _mirror_services().items():
        trusted = parse_networks(
            "trusted_proxies", _compose_replicated_raw_config(mirror).get("trusted_proxies")
        )
        assert any(lb in net for net in trusted), f"{name} does not trust the load balancer"
        assert not any(net.overlaps(others) for net in trusted), f"{name} trusts others too"


def test_haproxy_config_is_valid() -> None:
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        pytest.skip("haproxy is not installed (Debian package haproxy; make test installs it)")
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The replicas' names resolve only inside compose's network; nothing else may warn.
    for line in (result.stdout + result.stderr).splitlines():
        if "[WARNING]" in line:
            assert "could not resolve address" in line, line


def _docker_compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (Debian package; make test installs it)")
    return subprocess.run(
        ["docker-compose", "-p", "mirror-replicated", "-f", str(COMPOSE_REPLICATED), "config"],
        cwd=DEPLOY,
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_docker_compose_reads_the_replicated_file() -> None:
    """Debian's docker-compose (1.29) validates it against its schema and interpolates it."""
    keys = {"S3_ACCESS_KEY_ID": "id-for-the-test", "S3_SECRET_ACCESS_KEY": "not-a-real-secret"}
    result = _docker_compose_config(keys)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    for name in _mirror_services():
        env = resolved["services"][name]["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == "id-for-the-test"
        assert env["ADVERTISE_HOST"] == name
    # Without the bucket's keys it refuses to start rather than run with made-up ones.
    result = _docker_compose_config({})
    assert result.returncode != 0
    assert "S3_ACCESS_KEY_ID" in result.stderr


def test_kubectl_kustomize_renders_the_replicated_set() -> None:
    """kubectl's own kustomize builds the set: every file listed, nothing else, as parsed."""
    if shutil.which("kubectl") is None:
        pytest.skip("needs kubectl (kustomize)")
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES_REPLICATED)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d]

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    assert sorted(map(key, docs)) == sorted(map(key, _replicated_docs()))
    deployment = next(d for d in docs if key(d) == ("Deployment", "mirror"))
    assert deployment == _replicated("Deployment", "mirror")
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    (secret,) = [v["secret"] for v in volumes if "secret" in v]
    assert secret["defaultMode"] == 0o440  # YAML 1.1 octal, as kubectl reads it


# --- shutdown: every set lets the mirror stop by itself ------------------------------------

# What docker stop and Kubernetes give a container after SIGTERM when nothing says otherwise.
DOCKER_STOP_GRACE = 10.0
KUBERNETES_GRACE = 30.0


def _stop_seconds(raw: dict[str, Any]) -> tuple[float, float]:
    """(shutdown_delay, how long the mirror may take from SIGTERM to exit) under `raw`:
    the delay, shutdown_timeout, and with workers the supervisor's wait for their cleanup."""
    delay = parse_duration("shutdown_delay", raw.get("shutdown_delay", Config.shutdown_delay))
    timeout = parse_duration(
        "shutdown_timeout", raw.get("shutdown_timeout", Config.shutdown_timeout)
    )
    workers = raw.get("workers", Config.workers)
    return delay, delay + timeout + (CLEANUP_GRACE if workers != 1 else 0)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_kubernetes_pods_drain_before_they_stop(directory: Path) -> None:
    """Listeners closed at once on SIGTERM refuse what kube-proxy still sends there: a
    shutdown_delay covers the endpoints' propagation. Killed before shutdown_delay +
    shutdown_timeout, streams in flight are cut and a replica's leases left to run out."""
    docs = _kustomize(directory)
    delay, needed = _stop_seconds(_mirror_raw_config(docs))
    assert delay > 0, f"{directory.name}: no shutdown_delay"
    spec = _mirror_workload(docs)["spec"]["template"]["spec"]
    grace = spec.get("terminationGracePeriodSeconds", KUBERNETES_GRACE)
    assert grace >= needed, f"{directory.name}: {grace}s of grace, the mirror may take {needed}s"


def test_compose_gives_the_mirrors_time_to_stop() -> None:
    """docker stop's 10 s is under shutdown_timeout's 30 s: each mirror service says more."""
    services = {"compose.yaml mirror": _compose()["services"]["mirror"]}
    services |= {f"compose.replicated.yaml {n}": s for n, s in _mirror_services().items()}
    for name, service in services.items():
        config = _bind_mounts(service)[_environment(service)["MIRROR_CONFIG"]]
        _, needed = _stop_seconds(yaml.safe_load(config.read_text()))
        grace = parse_duration(name, service.get("stop_grace_period", DOCKER_STOP_GRACE))
        assert grace >= needed, f"{name}: stop_grace_period {grace}s, the mirror may take {needed}s"
