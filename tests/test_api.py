"""The registry API as a client sees it, through the mirror in front of the fake hub."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from mirror.config import Config, RedisConfig, UpstreamConfig
from mirror.storage import filesystem
from mirror.storage.filesystem import USERS_LOCK
from mirror.web import app as app_module
from mirror.web.keys import metrics_key, storage_key
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.services import RedisServer

Client = TestClient[Any, Any]
API_VERSION = "registry/2.0"
GOOD_DIGEST = "sha256:" + "0" * 64

BAD_NAMES = [
    "Library/nginx",
    "library/NGINX",
    "..",
    "library/..",
    "a//b",
    "a/",
    "-a",
    "a" * 300,
    "%2e%2e",
    "library/%2e%2e/%2e%2e",
    "a%2f..%2f..%2fetc",
    "..%2f..%2f..%2ftmp",
]
BAD_DIGESTS = [
    "sha256:short",
    "sha256:" + "A" * 64,
    "sha256:" + "0" * 63,
    "sha256:" + "0" * 65,
    "md5:" + "0" * 32,
    "sha256:",
    "sha256:" + "%2e%2e%2f" * 8,
    "sha512:" + "0" * 64,
]
BAD_TAGS = ["-x", ".x", "a" * 129, "a%2fb", "%2e%2e"]


async def send(client: Client, method: str, path: str, **kwargs: Any) -> ClientResponse:
    """A request whose path reaches the server exactly as written: no `..` folding, no
    re-encoding, as an attacker would send it."""
    url = URL(str(client.make_url("/")).rstrip("/") + path, encoded=True)
    return await client.session.request(method, url, **kwargs)


async def error_of(resp: ClientResponse) -> str:
    """The OCI error code of a JSON error body."""
    assert resp.content_type == "application/json", await resp.text()
    body = await resp.json()
    return str(body["errors"][0]["code"])


def stored_files(root: Path) -> list[str]:
    """Every file under the cache directory but the lock its users hold."""
    lock = str(root / USERS_LOCK)
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files
            if os.path.join(d, f) != lock]  # fmt: skip


def add_image(hub: FakeHub, repo: str, tag: str = "latest") -> dict[str, Any]:
    return hub.content.add_image(repo, tag, [f"layer of {repo}:{tag}".encode()])


async def fetch_manifest(client: Client, repo: str, tag: str = "latest") -> None:
    resp = await client.get(f"/v2/{repo}/manifests/{tag}")
    assert resp.status == 200, await resp.text()
    await resp.read()


# --- /v2/ -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_base_answers_200_with_api_version(client: Client, method: str) -> None:
    resp = await client.request(method, "/v2/")
    assert resp.status == 200
    assert resp.headers["Docker-Distribution-API-Version"] == API_VERSION


async def test_errors_carry_api_version(client: Client) -> None:
    resp = await client.get("/v2/UPPER/manifests/latest")
    assert resp.status == 400
    assert resp.headers["Docker-Distribution-API-Version"] == API_VERSION


# --- bad references -------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("kind", ["manifests/latest", f"blobs/{GOOD_DIGEST}", "tags/list"])
async def test_bad_name_is_400_name_invalid(client: Client, name: str, kind: str) -> None:
    resp = await send(client, "GET", f"/v2/{name}/{kind}")
    assert resp.status == 400
    assert await error_of(resp) == "NAME_INVALID"


async def test_bad_name_head_is_400_without_body(client: Client) -> None:
    resp = await send(client, "HEAD", "/v2/%2e%2e/manifests/latest")
    assert resp.status == 400
    assert await resp.read() == b""


@pytest.mark.parametrize("digest", BAD_DIGESTS)
@pytest.mark.parametrize("kind", ["blobs", "manifests", "referrers"])
async def test_bad_digest_is_400_digest_invalid(client: Client, digest: str, kind: str) -> None:
    resp = await send(client, "GET", f"/v2/library/nginx/{kind}/{digest}")
    assert resp.status == 400
    assert await error_of(resp) == "DIGEST_INVALID"


@pytest.mark.parametrize("tag", BAD_TAGS)
async def test_bad_tag_is_400_tag_invalid(client: Client, tag: str) -> None:
    resp = await send(client, "GET", f"/v2/library/nginx/manifests/{tag}")
    assert resp.status == 400
    assert await error_of(resp) == "TAG_INVALID"


async def test_longest_valid_tag_accepted(hub: FakeHub, client: Client) -> None:
    tag = "a" * 128
    add_image(hub, "library/nginx", tag)
    await fetch_manifest(client, "library/nginx", tag)


async def test_bad_input_writes_nothing(hub: FakeHub, client: Client, config: Config) -> None:
    add_image(hub, "library/nginx")
    paths = [f"/v2/{name}/manifests/latest" for name in BAD_NAMES]
    paths += [f"/v2/{name}/blobs/{GOOD_DIGEST}" for name in BAD_NAMES]
    paths += [f"/v2/library/nginx/blobs/{digest}" for digest in BAD_DIGESTS]
    paths += [f"/v2/library/nginx/manifests/{digest}" for digest in BAD_DIGESTS]
    paths += [f"/v2/library/nginx/manifests/{tag}" for tag in BAD_TAGS]
    for path in paths:
        resp = await send(client, "GET", path)
        assert resp.status == 400, path
    assert stored_files(config.storage.path) == []
    assert sorted(os.listdir(config.storage.path.parent)) == [config.storage.path.name]
    assert hub.stats.requests == []  # nothing bad was passed on either


# --- unknown content ------------------------------------------------------------------------


async def test_unknown_manifest_is_404_manifest_unknown(client: Client) -> None:
    resp = await client.get("/v2/library/nope/manifests/latest")
    assert resp.status == 404
    assert await error_of(resp) == "MANIFEST_UNKNOWN"


async def test_unknown_manifest_digest_is_404_manifest_unknown(client: Client) -> None:
    resp = await client.get(f"/v2/library/nope/manifests/{GOOD_DIGEST}")
    assert resp.status == 404
    assert await error_of(resp) == "MANIFEST_UNKNOWN"


async def test_unknown_blob_is_404_blob_unknown(client: Client, config: Config) -> None:
    resp = await client.get(f"/v2/library/nginx/blobs/{GOOD_DIGEST}")
    assert resp.status == 404
    assert await error_of(resp) == "BLOB_UNKNOWN"
    assert stored_files(config.storage.path) == []


async def test_unknown_blob_head_is_404(client: Client) -> None:
    resp = await client.head(f"/v2/library/nginx/blobs/{GOOD_DIGEST}")
    assert resp.status == 404


async def test_unknown_endpoint_is_404_oci_error(client: Client) -> None:
    resp = await client.get("/v2/library/nginx/whatever")
    assert resp.status == 404
    assert await error_of(resp)


@pytest.mark.parametrize("path", ["/v2/library/nginx/manifests/latest", "/v2/x/blobs/uploads/"])
async def test_an_unmet_expectation_is_417_with_an_oci_error(
    hub: FakeHub, client: Client, path: str
) -> None:
    """aiohttp answers `Expect` before the error middleware runs: it had a plain-text 417."""
    for method in ("GET", "POST"):
        resp = await client.request(method, path, headers={"Expect": "*"})
        assert resp.status == 417
        assert await error_of(resp) == "UNSUPPORTED"
    head = await client.head(path, headers={"Expect": "gzip"})
    assert head.status == 417 and await head.read() == b""
    assert hub.stats.requests == []
    # 100-continue is still met as before: a push's body is refused once it is sent.
    resp = await client.put(path, data=b"{}", headers={"Expect": "100-continue"})
    assert resp.status == 405 and await error_of(resp) == "UNSUPPORTED"


# --- push and delete ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/x/blobs/uploads/"),
        ("PATCH", "/v2/x/blobs/uploads/4b1d3c2e"),
        ("PUT", "/v2/x/blobs/uploads/4b1d3c2e?digest=" + GOOD_DIGEST),
        ("PUT", "/v2/x/manifests/latest"),
        ("DELETE", "/v2/x/manifests/" + GOOD_DIGEST),
        ("DELETE", "/v2/x/blobs/" + GOOD_DIGEST),
        ("DELETE", "/v2/x/manifests/latest"),
    ],
)
async def test_push_and_delete_are_405_unsupported(
    hub: FakeHub, client: Client, config: Config, method: str, path: str
) -> None:
    resp = await client.request(method, path, data=b'{"schemaVersion": 2}')
    assert resp.status == 405
    assert await error_of(resp) == "UNSUPPORTED"
    assert stored_files(config.storage.path) == []
    assert hub.stats.requests == []


# --- tags/list ------------------------------------------------------------------------------


async def test_tags_list_relayed(hub: FakeHub, client: Client) -> None:
    for tag in ["1.27", "1.28", "latest"]:
        add_image(hub, "library/nginx", tag)
    resp = await client.get("/v2/library/nginx/tags/list")
    assert resp.status == 200
    assert await resp.json() == {"name": "library/nginx", "tags": ["1.27", "1.28", "latest"]}
    assert "Link" not in resp.headers


async def test_tags_list_pages_with_relative_link(hub: FakeHub, client: Client) -> None:
    for tag in ["a", "b", "c", "d", "e"]:
        add_image(hub, "library/nginx", tag)
    resp = await client.get("/v2/library/nginx/tags/list", params={"n": "2", "last": "a"})
    assert resp.status == 200
    assert (await resp.json())["tags"] == ["b", "c"]
    link = resp.headers["Link"]
    assert link.startswith("</v2/")
    assert link.endswith('>; rel="next"')
    follow = await client.get(link[1 : link.index(">")])
    assert (await follow.json())["tags"] == ["d", "e"]


async def test_tags_list_of_unknown_repo_is_404(client: Client) -> None:
    resp = await client.get("/v2/library/nope/tags/list")
    assert resp.status == 404
    assert await error_of(resp) == "NAME_UNKNOWN"


async def test_absolute_upstream_link_made_relative(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    """An upstream whose next link is absolute (another host): the mirror asks its own
    upstream for that page, never the other host, and its Link points back at itself."""

    async def tags(request: web.Request) -> web.Response:
        if request.query.get("last") == "a":
            return web.json_response({"name": "x", "tags": ["b"]})
        link = '<https://upstream.example/v2/x/tags/list?last=a&n=1>; rel="next"'
        return web.json_response({"name": "x", "tags": ["a"]}, headers={"Link": link})

    app = web.Application()
    app.router.add_get("/v2/x/tags/list", tags)
    server: TestServer = await aiohttp_server(app)
    client = await make_client(upstream=UpstreamConfig(url=str(server.make_url("")).rstrip("/")))
    resp = await client.get("/v2/x/tags/list?n=1")
    assert resp.status == 200
    assert (await resp.json())["tags"] == ["a"]
    assert resp.headers["Link"] == '</v2/x/tags/list?last=a&n=1>; rel="next"'
    follow = await client.get("/v2/x/tags/list?last=a&n=1")
    assert (await follow.json())["tags"] == ["b"]
    assert "Link" not in follow.headers


# --- _catalog -------------------------------------------------------------------------------


async def test_catalog_empty(client: Client) -> None:
    resp = await client.get("/v2/_catalog")
    assert resp.status == 200
    assert await resp.json() == {"repositories": []}


async def test_catalog_lists_fetched_repositories(hub: FakeHub, client: Client) -> None:
    for repo in ["library/redis", "library/alpine", "bitnami/nginx", "never/fetched"]:
        add_image(hub, repo)
    for repo in ["library/redis", "library/alpine", "bitnami/nginx", "library/redis"]:
        await fetch_manifest(client, repo)
    resp = await client.get("/v2/_catalog")
    assert resp.status == 200
    assert await resp.json() == {
        "repositories": ["bitnami/nginx", "library/alpine", "library/redis"]
    }


async def test_catalog_pages_with_n_last_and_link(hub: FakeHub, client: Client) -> None:
    repos = ["library/a", "library/b", "library/c", "library/d", "library/e"]
    for repo in repos:
        add_image(hub, repo)
        await fetch_manifest(client, repo)
    resp = await client.get("/v2/_catalog", params={"n": "2"})
    assert (await resp.json())["repositories"] == repos[:2]
    link = resp.headers["Link"]
    assert link.startswith("</v2/_catalog?") and link.endswith('>; rel="next"')
    resp = await client.get(URL(link[1 : link.index(">")], encoded=True))
    assert (await resp.json())["repositories"] == repos[2:4]
    resp = await client.get("/v2/_catalog", params={"n": "2", "last": "library/d"})
    assert (await resp.json())["repositories"] == ["library/e"]
    assert "Link" not in resp.headers


async def test_catalog_bad_n_is_an_oci_error(client: Client) -> None:
    resp = await client.get("/v2/_catalog?n=lots")
    assert resp.status == 400
    assert await error_of(resp)


# --- operations endpoints -------------------------------------------------------------------


async def test_healthz(client: Client) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200


async def test_readyz_ok(client: Client) -> None:
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"storage": "ok", "metadata": "ok"}


async def test_readyz_503_when_storage_not_writable(client: Client, config: Config) -> None:
    # Tests run as root, for whom chmod changes nothing: make tmp/ a file instead.
    tmp = config.storage.path / "tmp"
    shutil.rmtree(tmp)
    tmp.write_bytes(b"not a directory")
    resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["storage"] != "ok"
    assert body["metadata"] == "ok"


async def test_a_cache_directory_emptied_while_running_is_used_again(
    hub: FakeHub, client: Client, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rm -rf /var/lib/mirror/*` under a running mirror: pulls are relayed uncached, and
    once the probe is due the layout is made again and blobs are kept (it never cached again,
    /readyz 503 until a restart)."""
    monkeypatch.setattr(filesystem, "PROBE_INTERVAL", 0.0)
    first, second = (hub.content.add_blob(os.urandom(4096)) for _ in range(2))
    root = config.storage.path
    for child in root.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    resp = await client.get(f"/v2/library/app/blobs/{first}")
    assert resp.status == 200 and len(await resp.read()) == 4096
    resp = await client.get("/readyz")
    assert (resp.status, (await resp.json())["storage"]) == (200, "ok")
    resp = await client.get(f"/v2/library/app/blobs/{second}")
    assert resp.status == 200 and len(await resp.read()) == 4096
    algorithm, hexpart = second.split(":")
    kept = root / "blobs" / algorithm / hexpart[:2] / hexpart
    for _ in range(100):  # renamed once its last byte is in: just after the client's
        if kept.exists():
            break
        await asyncio.sleep(0.05)
    assert kept.exists()
    assert (root / USERS_LOCK).exists()  # a serve starting now finds this one among its users


async def test_the_cache_size_is_counted_again_once_the_directory_was_emptied(
    hub: FakeHub, client: Client, config: Config
) -> None:
    """`rm -rf` under a running mirror (no bound: no periodic pass): once the layout is
    made again the size gauges count what is there, not what was (for good, before)."""
    digest = hub.content.add_blob(os.urandom(4096))
    resp = await client.get(f"/v2/library/app/blobs/{digest}")
    assert resp.status == 200 and len(await resp.read()) == 4096
    for _ in range(100):
        if await gauge(client, "mirror_cache_objects") == 1:
            break
        await asyncio.sleep(0.05)
    assert await gauge(client, "mirror_cache_size_bytes") == 4096
    root = config.storage.path
    for child in root.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()

    assert (await client.get("/readyz")).status == 200  # its probe makes the layout again
    for _ in range(100):
        if await gauge(client, "mirror_cache_objects") == 0:
            break
        await asyncio.sleep(0.05)
    assert await gauge(client, "mirror_cache_size_bytes") == 0
    assert await gauge(client, "mirror_cache_objects") == 0


async def test_a_directory_writable_again_is_reported_so_with_only_cached_pulls(
    hub: FakeHub, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A brief ENOSPC marked the cache unwritable; the space came back and clients pull only
    what is cached: `mirror_storage_writable` (a critical alert) returns to 1 all the same."""
    monkeypatch.setattr(filesystem, "PROBE_INTERVAL", 0.0)
    monkeypatch.setattr(app_module, "DISK_WATCH_INTERVAL", 0.05)
    client = await make_client()
    storage = client.app[storage_key]
    storage.mark_unwritable(OSError(errno.ENOSPC, "No space left on device"))
    assert await gauge(client, "mirror_storage_writable") == 0
    for _ in range(100):
        if await gauge(client, "mirror_storage_writable") == 1:
            break
        await asyncio.sleep(0.05)
    assert await gauge(client, "mirror_storage_writable") == 1
    assert storage.writable


async def gauge(client: Client, name: str) -> float | None:
    text = await (await client.get("/metrics")).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


async def test_readyz_with_redis(redis_server: RedisServer, make_client: MakeClient) -> None:
    client = await make_client(redis=RedisConfig(url=redis_server.url))
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"storage": "ok", "metadata": "ok"}


async def metric_samples(client: Client, name: str) -> dict[tuple[str, str, str], float]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                labels = sample.labels
                samples[(labels["route"], labels["method"], labels["status"])] = sample.value
    return samples


async def test_metrics_count_requests_by_route_method_status(hub: FakeHub, client: Client) -> None:
    add_image(hub, "library/nginx")
    await fetch_manifest(client, "library/nginx")
    await client.head("/v2/library/nginx/manifests/latest")
    await client.get("/v2/library/nope/manifests/latest")
    await client.get("/v2/")
    await client.get("/v2/")
    await client.post("/v2/x/blobs/uploads/")
    samples = await metric_samples(client, "mirror_http_requests_total")
    assert samples[("manifest", "GET", "200")] == 1
    assert samples[("manifest", "HEAD", "200")] == 1
    assert samples[("manifest", "GET", "404")] == 1
    assert samples[("base", "GET", "200")] == 2
    assert samples[("unsupported", "POST", "405")] == 1


async def test_request_counts_of_one_loop_turn_are_added_once_and_seen_by_metrics(
    hub: FakeHub, client: Client
) -> None:
    """Counts made on every request wait for the end of the event loop's turn (one inc
    each per turn, observe/metrics.py TurnCounts); /metrics adds this turn's first."""
    add_image(hub, "library/nginx")
    for _ in range(3):
        await fetch_manifest(client, "library/nginx")
    before = (await metric_samples(client, "mirror_http_requests_total"))[
        ("manifest", "GET", "200")
    ]
    metrics = client.app[metrics_key]
    series = metrics.http_requests.labels("manifest", "GET", "200")
    for _ in range(5):
        metrics.turn_counts.inc(series)
    labels = {"route": "manifest", "method": "GET", "status": "200"}
    in_registry = metrics.registry.get_sample_value("mirror_http_requests_total", labels)
    assert in_registry == before  # not yet: the turn has not ended
    samples = await metric_samples(client, "mirror_http_requests_total")
    assert samples[("manifest", "GET", "200")] == before + 5  # /metrics added them
    assert before == 3


async def test_metrics_are_collected_off_the_event_loop_in_either_format(client: Client) -> None:
    """With workers, collecting reads every worker's metric files (a dead one's stay): it
    ran on the event loop, which every request waits on."""
    collected_in: list[str] = []

    class Witness:
        def collect(self) -> Iterator[Metric]:
            collected_in.append(threading.current_thread().name)
            yield GaugeMetricFamily("witness", "where collection ran", value=1)

    registry = client.app[metrics_key].exposed
    registry.register(Witness())  # type: ignore[arg-type]
    collected_in.clear()  # registering collected once, to learn its names
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    assert "witness 1.0" in await resp.text()
    assert collected_in and threading.main_thread().name not in collected_in
    openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
    resp = await client.get("/metrics", headers=openmetrics)
    assert resp.content_type == "application/openmetrics-text"
    assert (await resp.text()).endswith("# EOF\n")
    resp = await client.get("/metrics?name[]=witness")
    assert [f.name for f in text_string_to_metric_families(await resp.text())] == ["witness"]


async def test_metrics_labels_never_carry_repository_names(hub: FakeHub, client: Client) -> None:
    add_image(hub, "library/nginx")
    await fetch_manifest(client, "library/nginx")
    text = await (await client.get("/metrics")).text()
    assert "mirror_http_requests_total" in text
    assert "library/nginx" not in text


async def test_metrics_never_contain_a_token(hub: FakeHub, client: Client) -> None:
    image = add_image(hub, "library/nginx")
    await fetch_manifest(client, "library/nginx")
    resp = await client.get(f"/v2/library/nginx/blobs/{image['layers'][0]}")
    assert resp.status == 200
    await resp.read()
    issued = list(hub._tokens)  # every token the hub handed out
    assert issued
    text = await (await client.get("/metrics")).text()
    for token in issued:
        assert token not in text
