"""The status page at `/`: upstreams and their health, hit ratios, cache size, top
repositories; every value escaped; rendered by a real headless Chromium (a screenshot and
the DOM it built) in front of a real mirror process.

Run `python -m pytest tests/test_status_page.py -q -s` to see where the screenshot went.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from mirror.config import Config, UpstreamConfig
from mirror.web.keys import metrics_key, upstreams_key
from mirror.web.monitor import create_monitor_app
from mirror.web.status import MAX_TRACKED, REFRESH_SECONDS, TOP, PullCounter
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.images import DOCKER_MANIFEST, busybox_image, push_image
from tests.services import DistributionRegistry, FakeHubProcess, MirrorProcess
from tests.test_pull_policy import auth_with, basic, ghcr, htpasswd, policy_mirror, token_for

__all__ = ["ghcr", "htpasswd"]  # fixtures shared with the pull-policy tests

Client = TestClient[Any, Any]
CHROMIUM = "chromium"
CHROMIUM_TIMEOUT = 90.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Everything the page is allowed to be made of: no script, image, iframe, form...
PAGE_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "table", "tr", "th", "td", "p",
    "a",
}  # fmt: skip
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Page(HTMLParser):
    """The status page's tables (rows of cell texts) and every start tag it holds."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.headings: list[str] = []
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "h2":
            self._heading = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self.tables:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "h2" and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data: str) -> None:
        for sink in (self._cell, self._heading):
            if sink is not None:
                sink.append(data)

    def table(self, heading: str) -> list[list[str]]:
        """The rows of the table under an h2 heading (tables follow headings in order)."""
        return self.tables[self.headings.index(heading)]

    def summary(self) -> dict[str, str]:
        return {row[0]: row[1] for row in self.table("Cache")}


async def status_page(client: Client) -> Page:
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert resp.charset == "utf-8"
    return Page(await resp.text())


async def pull(client: Client, repo: str, image: dict[str, Any]) -> None:
    """A client's pull: the manifest by tag, then the config and every layer."""
    resp = await client.get(f"/v2/{repo}/manifests/latest")
    assert resp.status == 200, await resp.text()
    await resp.read()
    for digest in [image["config"], *image["layers"]]:
        resp = await client.get(f"/v2/{repo}/blobs/{digest}")
        assert resp.status == 200, await resp.text()
        await resp.read()


async def settled(client: Client) -> None:
    """Wait until no download is in flight: a client has a blob's last byte once its hash
    matched, and the fsync and rename into the cache come a moment later."""
    for _ in range(250):
        metrics = await (await client.get("/metrics")).text()
        if "\nmirror_upstream_fetches_in_flight 0.0\n" in metrics:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("downloads still in flight after 5 s")


def kib(text: str) -> float:
    """`1.7 KiB`, `900 B`, `2.0 MiB` as KiB."""
    match = re.fullmatch(r"([\d.]+) (B|KiB|MiB|GiB)", text)
    assert match, f"not a size: {text!r}"
    return (
        float(match.group(1))
        * {"B": 1 / 1024, "KiB": 1, "MiB": 1024, "GiB": 1024**2}[match.group(2)]
    )


def disk_usage(root: Path) -> int:
    return sum(p.stat().st_size for top in ("blobs", "manifests") for p in (root / top).rglob("*")
               if p.is_file())  # fmt: skip


async def test_status_page_before_any_pull(make_client: MakeClient, config: Config) -> None:
    client = await make_client()
    page = await status_page(client)
    assert page.headings == ["Upstreams", "Cache", "Top repositories"]
    upstream = config.upstream
    assert page.table("Upstreams")[1:] == [
        [f"{upstream.registry} (default)", upstream.url, "up", "–"]
    ]
    summary = page.summary()
    assert summary["Blob hit ratio (requests)"] == "–"
    assert summary["Tag hit ratio (requests)"] == "–"
    assert summary["Cache size"] == "0 B (unbounded)"
    assert page.table("Top repositories")[1:] == [["(no pulls yet)", ""]]


async def test_status_page_after_pulls(
    hub: FakeHub, make_client: MakeClient, config: Config
) -> None:
    app = hub.content.add_image("library/app", "latest", [b"app layer\n" * 100, b"x" * 700])
    other = hub.content.add_image("team/other", "latest", [b"other layer\n" * 50])
    bound = 512 * 1024 * 1024
    client = await make_client(storage=replace(config.storage, max_size=bound))
    await pull(client, "library/app", app)  # cold: every blob a miss, the tag a miss
    await pull(client, "library/app", app)  # warm: every blob a hit, the tag a hit
    await pull(client, "team/other", other)
    await pull(client, "library/app", app)
    await settled(client)

    page = await status_page(client)
    rows = page.table("Upstreams")
    assert rows[0] == ["registry", "url", "health", "pulls left"]
    # The hub counts down from 100 per manifest GET: one per repository, the rest were hits.
    assert rows[1:] == [[f"{config.upstream.registry} (default)", hub.registry_url, "up", "98"]]

    summary = page.summary()
    # Blobs: 3 + 2 misses (cold pulls), 3 + 3 hits.  Tags: 2 misses, 2 hits.
    assert summary["Blob hit ratio (requests)"] == f"{100 * 6 / 11:.1f}%"
    assert summary["Tag hit ratio (requests)"] == "50.0%"
    assert summary["Hit ratio (bytes)"].endswith("%")
    assert summary["Storage writable"] == "yes"
    assert summary["Metadata store"] == "up"
    assert summary["Downloads in flight"] == "0"
    size, _, of = summary["Cache size"].partition(" of ")
    assert of == "512.0 MiB"
    on_disk = disk_usage(config.storage.path) / 1024
    assert abs(kib(size) - on_disk) <= 0.1, (size, on_disk)
    served_cache, served_upstream = (
        kib(summary["Served from cache"]), kib(summary["Served from upstream"])
    )  # fmt: skip
    app_bytes = sum(len(hub.content.blobs[d]) for d in [app["config"], *app["layers"]]) / 1024
    assert abs(served_cache - 2 * app_bytes) < 0.1
    assert served_upstream > app_bytes

    assert page.table("Top repositories")[1:] == [["library/app", "3"], ["team/other", "1"]]
    assert set(page.tags) <= PAGE_TAGS


async def test_status_page_shows_a_failing_upstream(hub: FakeHub, make_client: MakeClient) -> None:
    client = await make_client()
    hub.registry_status = 503
    for name in ("a", "b", "c", "d"):
        resp = await client.get(f"/v2/library/{name}/manifests/latest")
        assert resp.status == 503
        await resp.read()
    page = await status_page(client)
    assert page.table("Upstreams")[1][2] == "failing"


async def test_the_page_tells_an_upstream_s_health_as_the_metrics_do(
    hub: FakeHub, make_client: MakeClient
) -> None:
    """With workers, `mirror_upstream_up` is any worker's latest word; the page says the same
    (this worker's own circuit is closed), not "up" or "failing" by which worker answered."""
    client = await make_client()
    upstream = client.app[upstreams_key].default.name
    client.app[metrics_key].upstream_up.labels(upstream).set(0)  # another worker's circuit
    assert (await status_page(client)).table("Upstreams")[1][2] == "failing"
    client.app[metrics_key].upstream_up.labels(upstream).set(1)
    assert (await status_page(client)).table("Upstreams")[1][2] == "up"


async def test_status_page_escapes_every_value(
    hub: FakeHub, make_client: MakeClient, config: Config
) -> None:
    """Upstream names and URLs come from the config file: the page must show them, not run
    them. Repository names cannot carry markup (they are validated), but try anyway."""
    name = '<script>alert("name")</script>'
    url = "http://127.0.0.1:9/<img src=x onerror=alert(1)>?a=\"b\"&c='d'"
    client = await make_client(upstreams=(UpstreamConfig(url=url, name=name),))
    resp = await client.get("/v2/%3Cscript%3Ealert(1)%3C%2Fscript%3E/manifests/latest")
    assert resp.status == 400
    await resp.read()

    resp = await client.get("/")
    text = await resp.text()
    for raw in (name, url, "<script", "<img"):
        assert raw not in text, f"{raw!r} reached the page unescaped"
    assert html.escape(name) in text
    assert html.escape(url) in text
    page = Page(text)
    assert set(page.tags) <= PAGE_TAGS, f"unexpected elements: {set(page.tags) - PAGE_TAGS}"
    upstreams = page.table("Upstreams")[1:]
    assert [name, url, "up", "–"] in upstreams  # the browser shows the text as configured
    assert page.table("Top repositories")[1:] == [["(no pulls yet)", ""]]


# --- what each viewer is shown -----------------------------------------------------------

# alice alone may pull private/**; any logged-in user library/**; anonymous clients nothing.
VIEW_RULES = [
    {"who": ["alice"], "pull": ["docker.io/private/**"]},
    {"who": ["*"], "pull": ["docker.io/library/**"]},
]
PRIVATE = "private/acme-merger-2027"


async def test_the_page_names_only_the_repositories_its_viewer_may_pull(
    make_client: MakeClient, hub: FakeHub, ghcr: FakeHub, htpasswd: Path, aiohttp_server: Any
) -> None:
    """As the catalogue does: a private repository's name says a lot, so only those who may
    pull it see it; the counts that name no repository are everyone's."""
    client = await policy_mirror(make_client, hub, ghcr, auth=auth_with(htpasswd, VIEW_RULES))
    for repo in (PRIVATE, "library/busybox"):
        hub.content.add_image(repo, "latest", [repo.encode()])
        resp = await client.get(f"/v2/{repo}/manifests/latest", headers=basic("alice"))
        assert resp.status == 200, await resp.text()
    assert (await client.get("/v2/_catalog")).status == 401  # anonymous clients pull nothing

    async def seen_by(headers: dict[str, str]) -> tuple[str, list[list[str]]]:
        resp = await client.get("/", headers=headers)
        assert resp.status == 200
        text = await resp.text()
        assert Page(text).summary()["Tag hit ratio (requests)"] == "0.0%"
        return text, sorted(Page(text).table("Top repositories")[1:])

    text, rows = await seen_by({})
    assert "acme-merger" not in text and rows == [["(none to show)", ""]]
    wrong = {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}
    assert await seen_by(wrong) == (text, rows)  # bad credentials: an anonymous viewer
    assert (await seen_by(basic("bob")))[1] == [["library/busybox", "1"]]
    everything = [["library/busybox", "1"], [PRIVATE, "1"]]
    assert (await seen_by(basic("alice")))[1] == everything
    token = await token_for(client, "alice", PRIVATE)
    assert (await seen_by({"Authorization": f"Bearer {token}"}))[1] == everything
    # The monitoring listener (metrics.listen) is the operator's own address: every name.
    monitor = await aiohttp_server(create_monitor_app(client.app))
    async with client.session.get(monitor.make_url("/")) as resp:
        assert sorted(Page(await resp.text()).table("Top repositories")[1:]) == everything


def test_a_viewers_filtered_list_is_found_once_per_refresh_interval() -> None:
    """Filtering walks every tracked name through the policy when the viewer may see few
    (an anonymous one): once per page refresh interval for each viewer, not per view."""
    now = [0.0]
    pulls = PullCounter(clock=lambda: now[0])
    for i in range(MAX_TRACKED):
        pulls.add(f"team/repo-{i}")
    asked: list[str] = []

    def nothing(name: str) -> bool:
        asked.append(name)
        return False

    for _ in range(50):
        assert pulls.top(TOP, nothing, viewer="") == []
        now[0] += REFRESH_SECONDS / 100
    assert len(asked) == MAX_TRACKED  # the first view walked them all, the others reused it
    assert pulls.top(TOP, lambda name: name == "team/repo-7", viewer="bob") == [("team/repo-7", 1)]
    now[0] += REFRESH_SECONDS
    pulls.add("team/repo-9")
    assert pulls.top(TOP, nothing, viewer="") == []
    assert len(asked) == 2 * MAX_TRACKED  # the window passed: found again
    assert pulls.top(TOP, lambda name: name.endswith("-9"), viewer="bob")[0] == ("team/repo-9", 2)


# --- in a real browser --------------------------------------------------------------------


def run_chromium(*args: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    """Headless Chromium in a session of its own, so that every helper it starts goes
    with it; a hung run is killed whole."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={workdir / 'profile'}", "--window-size=1000,800",
        *args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        text=True, start_new_session=True, cwd=workdir, env=env,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT:.0f}s: {' '.join(args)}")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # helpers that outlived the browser
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def http_get(url: str, headers: dict[str, str] | None = None) -> bytes:
    with _OPENER.open(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
        body: bytes = resp.read()
    return body


def pull_through(mirror_url: str, repo: str, tag: str = "latest") -> dict[str, Any]:
    """A Docker-like pull over HTTP: the manifest, then its config and layers."""
    manifest = json.loads(
        http_get(f"{mirror_url}/v2/{repo}/manifests/{tag}", {"Accept": DOCKER_MANIFEST})
    )
    for blob in [manifest["config"], *manifest["layers"]]:
        data = http_get(f"{mirror_url}/v2/{repo}/blobs/{blob['digest']}")
        assert len(data) == blob["size"]
    result: dict[str, Any] = manifest
    return result


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="chromium is not installed "
                    "(Debian package chromium: apt-get install -y chromium)")  # fmt: skip
@pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry missing")
def test_status_page_in_chromium(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    with (
        DistributionRegistry(tmp_path / "registry") as registry,
        FakeHubProcess(registry.url, workdir=tmp_path / "fakehub") as hub,
        MirrorProcess(tmp_path / "mirror", hub.registry_url) as mirror,
    ):
        push_image(registry.url, "library/busybox", "latest", busybox_image())
        hub_url = hub.registry_url
        pull_through(mirror.url, "library/busybox")
        pull_through(mirror.url, "library/busybox")  # now from the cache

        browser = tmp_path / "chromium"
        browser.mkdir()
        shot = browser / "status.png"
        done = run_chromium(f"--screenshot={shot}", f"{mirror.url}/", workdir=browser)
        assert done.returncode == 0, done.stderr[-3000:]
        dom = run_chromium("--dump-dom", f"{mirror.url}/", workdir=browser)
        assert dom.returncode == 0, dom.stderr[-3000:]

    assert shot.is_file(), f"no screenshot; chromium said:\n{done.stderr[-3000:]}"
    data = shot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5 * 1024, f"a {len(data)}-byte screenshot is too small to show the page"
    stable = tmp_path_factory.getbasetemp() / "status.png"
    shutil.copy(shot, stable)
    print(f"\nstatus page screenshot: {stable}")

    page = Page(dom.stdout)
    assert "mirror status" in dom.stdout
    upstreams = page.table("Upstreams")[1:]
    host = hub_url.removeprefix("http://")
    assert upstreams == [[f"{host} (default)", hub_url, "up", upstreams[0][3]]]
    assert page.table("Top repositories")[1:] == [["library/busybox", "2"]]
    assert page.summary()["Blob hit ratio (requests)"] == "50.0%"
