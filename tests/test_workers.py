"""`workers: 2`: one supervisor, two worker processes on the same port and cache directory.

    client -> mirror supervisor (binds, restarts, drains) -> 2 workers -> fake hub -> distribution

Requests spread over both (the access lines name the worker), /metrics adds both up, a
worker killed with SIGKILL is replaced, SIGTERM lets a download in flight finish, and a
worker that cannot start stops them all with status 2.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procmem import descendants, runs_uvloop
from tests.resilience_helpers import (
    MIB,
    RandomImage,
    log_since_last_start,
    metric_value,
    seed_random_image,
    tail,
    write_config,
)
from tests.services import (
    REPO_ROOT,
    DistributionRegistry,
    FakeHubProcess,
    MirrorProcess,
    free_port,
    wait_for,
)
from tests.test_status_page import Page
from tests.workers_helpers import eventually

WORKERS = 2


def _require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make system-deps installs them)")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    _require("docker-registry")
    with DistributionRegistry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


@pytest.fixture(scope="module")
def big(registry: DistributionRegistry) -> RandomImage:
    return seed_random_image(registry.url, "big", 16 * MIB, seed=51)


@pytest.fixture
def hub(
    tmp_path: Path, registry: DistributionRegistry, big: RandomImage
) -> Iterator[FakeHubProcess]:
    with FakeHubProcess(registry.url, workdir=tmp_path / "fakehub") as hub:
        yield hub


def start_mirror(tmp_path: Path, upstream: str, **config: Any) -> MirrorProcess:
    """A mirror with `workers: 2` and JSON logs, its workers both serving."""
    path = write_config(
        tmp_path / "mirror.yml", {"workers": WORKERS, "log": {"format": "json"}, **config}
    )
    mirror = MirrorProcess(tmp_path / "mirror", upstream, extra_args=["--config", str(path)])
    mirror.start()
    wait_for("both workers serving", lambda: len(serving(mirror)) >= WORKERS)
    return mirror


@pytest.fixture
def stop_after() -> Iterator[list[MirrorProcess]]:
    started: list[MirrorProcess] = []
    yield started
    for mirror in started:
        mirror.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # A new connection per request: the kernel hands each to whichever worker accepts it.
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, timeout=timeout
    ) as session:
        yield session


def log_records(mirror: MirrorProcess) -> list[dict[str, Any]]:
    records = []
    for line in log_since_last_start(mirror.log_path).splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def serving(mirror: MirrorProcess) -> list[dict[str, Any]]:
    """The "serving on" lines of the workers started so far."""
    return [r for r in log_records(mirror) if r["message"].startswith("serving on")]


def workers_of(mirror: MirrorProcess) -> set[int]:
    return descendants(mirror.pid) - {mirror.pid}


async def get_base(session: aiohttp.ClientSession, mirror: MirrorProcess) -> int:
    async with session.get(f"{mirror.url}/v2/") as resp:
        await resp.read()
        return resp.status


async def metrics_text(session: aiohttp.ClientSession, mirror: MirrorProcess) -> str:
    async with session.get(
        f"{mirror.url}/metrics", headers={"Accept-Encoding": "identity"}
    ) as resp:
        assert resp.status == 200
        return await resp.text()


async def _answered(mirror: MirrorProcess, sent: int) -> list[dict[str, Any]]:
    """The access records of `/v2/`, once all `sent` are written (each worker logs its own,
    after its answer: a loaded machine can take seconds to get there)."""
    deadline = time.monotonic() + 60
    while True:
        answered = [r for r in log_records(mirror) if r.get("path") == "/v2/"]
        if len(answered) >= sent:
            return answered
        if time.monotonic() > deadline:
            raise AssertionError(f"{sent} requests sent, {len(answered)} logged")
        await asyncio.sleep(0.05)


async def test_requests_spread_over_both_workers_and_metrics_add_them_up(
    tmp_path: Path, session: aiohttp.ClientSession, stop_after: list[MirrorProcess]
) -> None:
    mirror = start_mirror(tmp_path, "http://127.0.0.1:9")
    stop_after.append(mirror)
    assert len(workers_of(mirror)) == WORKERS
    # Each worker is `mirror serve` on the same config: the same loop, uvloop by default.
    assert all(runs_uvloop(pid) for pid in workers_of(mirror))
    # Without Redis, the start-up line names where the workers share tags: not "in-process".
    assert all(
        r["message"].endswith("metadata sqlite (shared by the workers)") for r in serving(mirror)
    )
    sent = 0
    by_worker: dict[int, int] = {}
    # Ten at a time, each on its own connection, until both workers have answered (the
    # kernel hands a shared socket's connections to whichever worker accepts first: a busy
    # machine can give the first batches to one worker alone).
    for _ in range(60):
        statuses = await asyncio.gather(*(get_base(session, mirror) for _ in range(10)))
        assert statuses == [200] * 10
        sent += 10
        answered = await _answered(mirror, sent)
        by_worker = {w: sum(1 for r in answered if r["worker"] == w) for w in (1, 2)}
        if sent >= 60 and all(by_worker.values()):
            break
    print(f"requests by worker: {by_worker}")
    assert all(by_worker.values()), f"one worker answered nothing: {by_worker}"

    text = await metrics_text(session, mirror)
    base = {"route": "base", "method": "GET", "status": "200"}
    assert metric_value(text, "mirror_http_requests_total", base) == sent
    assert metric_value(text, "mirror_worker_restarts_total") == 0
    # Every gauge has a mode that adds or picks: none is split by process id.
    assert 'pid="' not in text
    # Asked for one series by name, as Prometheus' `params: {name[]: …}` does: the sum.
    named = f"{mirror.url}/metrics?name[]=mirror_http_requests_total"
    async with session.get(named, headers={"Accept-Encoding": "identity"}) as resp:
        only = await resp.text()
    assert metric_value(only, "mirror_http_requests_total", base) == sent
    assert "mirror_worker_restarts_total" not in only


async def test_metrics_listen_is_bound_by_the_supervisor_and_served_by_every_worker(
    tmp_path: Path, session: aiohttp.ClientSession, stop_after: list[MirrorProcess]
) -> None:
    """The supervisor bound the client listeners alone, and each worker found one socket
    fewer than its listeners: no worker could start with `metrics.listen` set."""
    port = free_port()
    mirror = start_mirror(tmp_path, "http://127.0.0.1:9", metrics={"listen": f"127.0.0.1:{port}"})
    stop_after.append(mirror)
    assert len(workers_of(mirror)) == WORKERS
    statuses = await asyncio.gather(*(get_base(session, mirror) for _ in range(10)))
    assert statuses == [200] * 10
    await _answered(mirror, 10)
    identity = {"Accept-Encoding": "identity"}
    async with session.get(f"http://127.0.0.1:{port}/metrics", headers=identity) as resp:
        assert resp.status == 200
        text = await resp.text()
    base = {"route": "base", "method": "GET", "status": "200"}
    assert metric_value(text, "mirror_http_requests_total", base) == 10  # both workers'
    async with session.get(f"{mirror.url}/metrics") as resp:
        assert resp.status == 404  # off the client listener


async def test_a_killed_worker_is_restarted_and_counted(
    tmp_path: Path, session: aiohttp.ClientSession, stop_after: list[MirrorProcess]
) -> None:
    mirror = start_mirror(tmp_path, "http://127.0.0.1:9")
    stop_after.append(mirror)
    before = workers_of(mirror)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    wait_for("a new worker", lambda: len(serving(mirror)) == WORKERS + 1)
    after = workers_of(mirror)
    assert len(after) == WORKERS and victim not in after and before - {victim} <= after

    statuses = await asyncio.gather(*(get_base(session, mirror) for _ in range(20)))
    assert statuses == [200] * 20
    text = await metrics_text(session, mirror)
    assert metric_value(text, "mirror_worker_restarts_total") == 1
    # The dead worker's requests are still counted; its gauges are not.
    killed = [r for r in log_records(mirror) if "was killed by SIGKILL" in r["message"]]
    assert len(killed) == 1, tail(log_since_last_start(mirror.log_path))


async def test_the_pull_budget_outlives_the_worker_that_heard_it(
    tmp_path: Path,
    hub: FakeHubProcess,
    session: aiohttp.ClientSession,
    stop_after: list[MirrorProcess],
) -> None:
    """The upstream's ratelimit headers, heard by one worker, stay on /metrics once every
    worker that heard them died (MirrorPullBudgetLow must not resolve with a worker)."""
    mirror = start_mirror(tmp_path, hub.registry_url)
    stop_after.append(mirror)
    async with session.get(f"{mirror.url}/v2/library/big/manifests/latest") as resp:
        assert resp.status == 200
    budget = "mirror_upstream_ratelimit_remaining"
    assert metric_value(await metrics_text(session, mirror), budget) is not None
    for deaths in (1, 2):  # both workers: the one that heard it is among them
        os.kill(min(workers_of(mirror)), signal.SIGKILL)
        wait_for("a new worker", lambda: len(serving(mirror)) == WORKERS + deaths)  # noqa: B023

    assert metric_value(await metrics_text(session, mirror), budget) is not None


def metric_files(mirror: MirrorProcess) -> set[str]:
    """Whose counter and histogram files the workers' metrics directory holds: pids, or
    "folded" for the dead workers' sums."""
    environ = Path(f"/proc/{min(workers_of(mirror))}/environ").read_bytes().split(b"\0")
    prefix = b"PROMETHEUS_MULTIPROC_DIR="
    path = Path(next(e for e in environ if e.startswith(prefix))[len(prefix) :].decode())
    kinds = ("counter_", "histogram_")
    return {f.stem.split("_")[-1] for f in path.glob("*.db") if f.name.startswith(kinds)}


async def test_dead_workers_counts_are_folded_into_one_pair_of_files_and_still_summed(
    tmp_path: Path, session: aiohttp.ClientSession, stop_after: list[MirrorProcess]
) -> None:
    """Each dead worker left its counter and histogram files, read by every scrape from
    then on: a worker crashing now and then made /metrics slower for as long as the
    supervisor ran. Its counts are added to one pair of files; none is lost or doubled."""
    mirror = start_mirror(tmp_path, "http://127.0.0.1:9")
    stop_after.append(mirror)
    sent = 0
    for deaths in range(1, 4):
        statuses = await asyncio.gather(*(get_base(session, mirror) for _ in range(10)))
        assert statuses == [200] * 10
        sent += 10
        await _answered(mirror, sent)
        os.kill(min(workers_of(mirror)), signal.SIGKILL)
        wait_for("a new worker", lambda: len(serving(mirror)) == WORKERS + deaths)  # noqa: B023
        assert metric_files(mirror) == {str(pid) for pid in workers_of(mirror)} | {"folded"}

    text = await metrics_text(session, mirror)
    base = {"route": "base", "method": "GET", "status": "200"}
    assert metric_value(text, "mirror_http_requests_total", base) == sent
    timed = metric_value(text, "mirror_http_request_duration_seconds_count", {"route": "base"})
    assert timed == sent
    assert metric_value(text, "mirror_worker_restarts_total") == 3


async def test_sigterm_lets_a_download_in_flight_finish_then_all_exit_zero(
    tmp_path: Path,
    hub: FakeHubProcess,
    big: RandomImage,
    session: aiohttp.ClientSession,
    stop_after: list[MirrorProcess],
) -> None:
    mirror = start_mirror(tmp_path, hub.registry_url, shutdown_timeout="20s")
    stop_after.append(mirror)
    workers = workers_of(mirror)
    async with session.post(f"{hub.registry_url}/_knobs", json={"cdn_delay": 0.015}) as resp:
        assert resp.status == 200  # ~4 s for the whole blob: SIGTERM lands inside it
    async with session.get(mirror.url + big.blob_path) as resp:
        assert resp.status == 200
        head = await resp.content.readexactly(MIB)
        assert mirror.proc is not None
        os.kill(mirror.pid, signal.SIGTERM)
        rest = await resp.read()
    assert head + rest == big.data
    status = await asyncio.to_thread(mirror.proc.wait, 30)
    assert status == 0, tail(log_since_last_start(mirror.log_path))
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


async def test_a_restarted_worker_runs_the_config_read_at_start_not_an_edit_since(
    tmp_path: Path, session: aiohttp.ClientSession, stop_after: list[MirrorProcess]
) -> None:
    """A restarted worker read the file again: a valid edit reached one worker of N, and
    a broken one made it exit 2, which stopped every worker (one crash, a whole outage)."""
    mirror = start_mirror(tmp_path, "http://127.0.0.1:9")
    stop_after.append(mirror)
    workers = workers_of(mirror)
    (tmp_path / "mirror.yml").write_text("workers: [\n")  # an edit that does not parse
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_for("a new worker", lambda: len(serving(mirror)) == WORKERS + 1)
    assert mirror.proc is not None and mirror.proc.poll() is None
    after = workers_of(mirror)
    assert len(after) == WORKERS and victim not in after and workers - {victim} <= after
    statuses = await asyncio.gather(*(get_base(session, mirror) for _ in range(20)))
    assert statuses == [200] * 20
    assert "is not valid YAML" not in log_since_last_start(mirror.log_path)


def test_a_taken_port_is_one_line_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "mirror.yml", {"workers": WORKERS})
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "mirror", "serve", "--config", str(config),
             "--listen", f"127.0.0.1:{port}", "--storage", str(tmp_path / "data")],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"mirror: config: listen: cannot listen on 127.0.0.1:{port}: address already in use;"
        " set listen to a free address"
    ]
    assert "workers serving" not in done.stdout + done.stderr
    print(f"exited in {time.monotonic() - started:.1f}s")


async def test_the_status_page_shows_every_workers_figures_whichever_answers(
    tmp_path: Path,
    hub: FakeHubProcess,
    big: RandomImage,
    session: aiohttp.ClientSession,
    stop_after: list[MirrorProcess],
) -> None:
    """Served bytes and the cache size are the sums /metrics shows, not the figures of the
    worker that happened to answer: page after page, they stay the same."""
    mirror = start_mirror(tmp_path, hub.registry_url)
    stop_after.append(mirror)

    def answered(path: str) -> list[dict[str, Any]]:
        return [r for r in log_records(mirror) if r.get("path") == path]

    async def until_both_answer(path: str, check: Any) -> None:
        before = len(answered(path))
        for sent in range(1, 61):
            async with session.get(mirror.url + path) as resp:
                assert resp.status == 200
                check(await resp.read())
            await eventually(
                f"{sent} access lines", lambda n=before + sent: len(answered(path)) >= n
            )
            if {r["worker"] for r in answered(path)} == {1, 2}:
                return
        raise AssertionError(f"one worker answered every {path}")

    def whole(body: bytes) -> None:
        assert body == big.data

    async def kept() -> bool:  # a client has its last byte before the blob's rename
        size = metric_value(await metrics_text(session, mirror), "mirror_cache_size_bytes")
        return size is not None and size >= len(big.data)

    # The first GET fetches it; the next ones, once it is kept, are served from the cache
    # (one sent before the rename follows the download: counted as from upstream).
    async with session.get(mirror.url + big.blob_path) as resp:
        whole(await resp.read())
    await eventually("its access line", lambda: len(answered(big.blob_path)) == 1)
    await eventually("the blob kept and counted", kept)
    await until_both_answer(big.blob_path, whole)
    pages: list[dict[str, str]] = []
    await until_both_answer("/", lambda body: pages.append(Page(body.decode()).summary()))
    for _ in range(max(10 - len(pages), 1)):
        async with session.get(f"{mirror.url}/") as resp:
            text = await resp.text()
            pages.append(Page(text).summary())
    assert "Pulls of every worker" in text
    shown = {
        (page["Served from cache"], page["Served from upstream"], page["Cache size"])
        for page in pages
    }
    assert len(shown) == 1, shown
    ((from_cache, from_upstream, size),) = shown
    assert from_upstream == "16.0 MiB" and size.startswith("16.0 MiB"), shown
    assert from_cache == f"{16 * (len(answered(big.blob_path)) - 1)}.0 MiB"

    # Pulls per repository: every worker's, whichever answers the page (each publishes
    # its counts every few seconds), not the answering worker's alone.
    manifest = f"/v2/{big.repo}/manifests/{big.tag}"
    await until_both_answer(manifest, lambda body: None)
    pulled = len(answered(manifest))

    async def every_pull_shown() -> bool:
        async with session.get(f"{mirror.url}/") as resp:
            top = Page(await resp.text()).table("Top repositories")[1:]
        return top == [[big.repo, str(pulled)]]

    for _ in range(4):  # page after page, whichever worker answers
        await eventually(f"{pulled} pulls of {big.repo} on the page", every_pull_shown)


async def test_sigterm_leaves_the_workers_their_drain_before_the_kill_deadline(
    tmp_path: Path, session: aiohttp.ClientSession, stop_after: list[MirrorProcess]
) -> None:
    """Each worker answers /readyz 503 for shutdown_delay, still serving, before its
    requests get shutdown_timeout: a supervisor that counted shutdown_timeout alone
    (and its cleanup grace) killed workers drained for longer than that grace."""
    mirror = start_mirror(tmp_path, "http://127.0.0.1:9", shutdown_delay="18s",
                          shutdown_timeout="1s")  # fmt: skip
    stop_after.append(mirror)
    assert mirror.proc is not None
    os.kill(mirror.pid, signal.SIGTERM)
    # The supervisor passes the signal on: a worker may answer once more before it has it.
    # Up to 15 s, inside the 18 s drain: a loaded machine can be slow to pass it on.
    for _ in range(300):
        async with session.get(f"{mirror.url}/readyz") as resp:
            if resp.status == 503:  # draining: the listeners stay open meanwhile
                break
        await asyncio.sleep(0.05)
    assert resp.status == 503
    status = await asyncio.to_thread(mirror.proc.wait, 60)
    log = log_since_last_start(mirror.log_path)
    assert status == 0, tail(log)
    assert "did not stop in time" not in log, tail(log)
