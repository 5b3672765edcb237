"""A rolling update under load, as real processes: three replicas behind haproxy restarted one
at a time, within this release and from the previous release to this one, lose no pull and
fetch each digest from the upstream once.

    pullers (aiohttp) -> haproxy (checks /readyz, redispatch) -> 3 mirror processes
        (cluster:, one Redis, one RGW bucket) -> fake hub (its CDN crawling at times)
        -> distribution

Before each replica stops, a new image is pushed upstream and that replica starts the
download of its layer (so it holds the lease); half the pullers then pull the image through
haproxy, so the stopping replica has downloads in flight as it drains and closes, its own
client's and the other replicas' streams from it. The other pullers go on pulling the
images already cached, so requests keep arriving while it stops. Once restarted, the
replica leads the download of the next new image, which the others follow (in an update,
the previous release's replicas follow this release's).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cluster_helpers import cluster_section, s3_section, set_knobs
from tests.loadbalancer import HAProxy
from tests.redis_topologies import flushed_redis_url
from tests.releases import PREVIOUS_RELEASE, REPO_ROOT, unpack_release
from tests.resilience_helpers import (
    MANIFEST_ACCEPT,
    Puller,
    RandomImage,
    connect_refused,
    seed_random_image,
    write_config,
)
from tests.rgw import CephRGW
from tests.services import DistributionRegistry, FakeHubProcess, MirrorProcess, http_status

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
LAYER_SIZE = 3 * MiB
# Seconds the fake hub's CDN waits per 64 KiB while a replica stops or leads a new image's
# download (at full speed otherwise): that download cannot end meanwhile.
CRAWL = 0.5
PULLERS = 4
PAUSE = 0.05  # seconds between a puller's pulls: a steady load, not a flood on two cores
REPLICAS = 3
CHECK_INTERVAL_MS = 250  # haproxy's /readyz checks; two failures take a replica out
SHUTDOWN_DELAY = 1.5  # longer than those two checks
LEASE_TTL = 10.0
EXIT_TIMEOUT = 60.0  # shutdown_delay + shutdown_timeout (30 s) and some
CURRENT, PREVIOUS = "current", "previous"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    with DistributionRegistry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Where each release's `mirror` package is: this checkout, and the previous release
    unpacked from git."""
    previous = unpack_release(PREVIOUS_RELEASE, tmp_path_factory.mktemp("previous"))
    if previous is None:
        pytest.skip(f"{PREVIOUS_RELEASE} is not in this clone")
    return {CURRENT: REPO_ROOT, PREVIOUS: previous}


@pytest.fixture
def hub(tmp_path: Path, registry: DistributionRegistry) -> Iterator[FakeHubProcess]:
    with FakeHubProcess(registry.url, workdir=tmp_path / "fakehub") as hub:
        yield hub


@dataclass
class Replica:
    """A mirror process and the config file each release accepts."""

    process: MirrorProcess
    configs: dict[str, Path]
    trees: dict[str, Path]

    def use(self, release: str) -> None:
        """Run `release`'s code with its config from the next start()."""
        self.process.code_root = self.trees[release]
        self.process.extra_args = ("--config", str(self.configs[release]))


def start_replicas(
    stack: ExitStack,
    tmp_path: Path,
    hub: FakeHubProcess,
    shared: dict[str, Any],
    trees: dict[str, Path],
    release: str,
) -> list[Replica]:
    """REPLICAS processes of one cluster running `release`, started and ready."""
    replicas = []
    for index in range(REPLICAS):
        workdir = tmp_path / f"replica{index}"
        process = MirrorProcess(workdir, hub.registry_url)
        config = {**shared, "cluster": cluster_section(tmp_path, process, index, LEASE_TTL)}
        # The previous release refuses keys it does not know: shutdown_delay is newer.
        configs = {
            PREVIOUS: write_config(workdir / "previous.yaml", config),
            CURRENT: write_config(
                workdir / "current.yaml", {**config, "shutdown_delay": f"{SHUTDOWN_DELAY}s"}
            ),
        }
        replica = Replica(process, configs, trees)
        replica.use(release)
        replicas.append(replica)
    # Registered before any starts, so a failed start stops the others too. Each start
    # and stop takes seconds: side by side.
    stack.callback(side_by_side, [r.process.stop for r in replicas])
    side_by_side([r.process.start for r in replicas])
    return replicas


def side_by_side(calls: list[Callable[[], object]]) -> None:
    with ThreadPoolExecutor(len(calls)) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()


@dataclass
class Load:
    """Pullers that pull until told to stop, every manifest and blob checked against its
    digest: half of them the newest image and an older one in turn, the other half only
    older ones (cached: their requests go on while the newest one's download crawls)."""

    session: aiohttp.ClientSession
    base: str
    images: list[RandomImage]
    pullers: list[Puller] = field(default_factory=list)
    blobs: set[str] = field(default_factory=set)  # every blob digest a client asked for
    started: Counter[str] = field(default_factory=Counter)  # blob GETs begun, by digest
    pulled: Counter[str] = field(default_factory=Counter)  # pulls gone through, by repository
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        self.pullers = [Puller(self.session, self.base) for _ in range(PULLERS)]
        await asyncio.gather(*(self._pull_on(p, i) for i, p in enumerate(self.pullers)))

    async def _pull_on(self, puller: Puller, index: int) -> None:
        turn = index
        while not self.stopping.is_set():
            if index % 2 == 0:
                await self.pull(puller, self.images[-1])
            turn += 1
            older = self.images[:-1] or self.images
            await self.pull(puller, older[turn % len(older)])
            await asyncio.sleep(PAUSE)

    async def pull(self, puller: Puller, image: RandomImage) -> None:
        """The manifest by tag, then its config and layers: Puller records any failure."""
        status, _, body = await puller.request(
            "GET", f"/v2/{image.repo}/manifests/{image.tag}", {"Accept": MANIFEST_ACCEPT},
            expect_digest=image.manifest_digest,
        )  # fmt: skip
        if status != 200 or body is None:
            return
        manifest = json.loads(body)
        for blob in [manifest["config"]["digest"]] + [d["digest"] for d in manifest["layers"]]:
            self.blobs.add(blob)
            self.started[blob] += 1
            await puller.request(
                "GET", f"/v2/{image.repo}/blobs/{blob}", expect_digest=blob, keep_body=False
            )
        self.pulled[image.repo] += 1

    async def all_pulled_by_all(self) -> bool:
        """Whether each image was pulled as often as there are pullers (so no download
        of them is left)."""
        return all(self.pulled[image.repo] >= PULLERS for image in self.images)

    @property
    def errors(self) -> list[str]:
        return [error for puller in self.pullers for error in puller.errors]

    @property
    def requests(self) -> int:
        return sum(puller.requests for puller in self.pullers)


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    """Poll `check` until it is true; fail naming `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def layer_fetch_begun(hub: FakeHubProcess, image: RandomImage) -> bool:
    stats = await asyncio.to_thread(hub.stats)
    return image.layer_digest in stats["cdn_get_by_digest"]


async def ready(replica: MirrorProcess) -> bool:
    return await asyncio.to_thread(http_status, f"{replica.url}/readyz") == 200


async def refused(replica: MirrorProcess) -> bool:
    """Whether the replica has closed its listener (a connection is refused)."""
    return await asyncio.to_thread(connect_refused, replica.port)


async def exited(replica: MirrorProcess) -> int:
    """Wait for the process to exit by itself (it was sent SIGTERM); its exit status."""
    assert replica.proc is not None
    try:
        return await asyncio.to_thread(replica.proc.wait, EXIT_TIMEOUT)
    finally:
        replica.stop()  # the group's leftovers, the log file; SIGKILL if it never exited


@dataclass
class Roll:
    """Replaces each replica in turn: a cold image's download led by it is in flight as it
    stops, and the restarted replica leads the next cold image's download."""

    registry: DistributionRegistry
    hub: FakeHubProcess
    load: Load
    own_clients: list[Puller] = field(default_factory=list)  # a leading replica's client each
    leading: list[asyncio.Task[None]] = field(default_factory=list)  # their pulls
    exits: list[int] = field(default_factory=list)
    in_flight_at_close: list[bool] = field(default_factory=list)
    requests_while_stopping: list[int] = field(default_factory=list)  # through haproxy

    async def replace(self, replica: Replica, release: str) -> None:
        await until("no download left", self.load.all_pulled_by_all)
        process = replica.process
        owner = await self.lead(process)
        assert process.proc is not None
        requests = self.load.requests
        process.proc.send_signal(signal.SIGTERM)
        await until("the listener closed", lambda: refused(process))
        self.in_flight_at_close.append(not owner.done())
        await asyncio.to_thread(set_knobs, self.hub, cdn_delay=0)
        self.exits.append(await exited(process))
        self.requests_while_stopping.append(self.load.requests - requests)
        await owner  # its client got every byte (checked with the other errors)
        replica.use(release)
        await asyncio.to_thread(process.start)
        await until("/readyz 200 after the restart", lambda: ready(process))
        # The other replicas (the previous release's, in an update) follow its download.
        await self.lead(process)
        await asyncio.to_thread(set_knobs, self.hub, cdn_delay=0)

    async def lead(self, process: MirrorProcess) -> asyncio.Task[None]:
        """A new image pushed upstream, whose layer `process` starts fetching for its own
        client (so it holds the lease); then the pullers pull it through haproxy. The CDN
        crawls from here until the caller lets it go: the download is in flight until
        then, whatever the machine's speed."""
        await asyncio.to_thread(set_knobs, self.hub, cdn_delay=CRAWL)
        number = len(self.own_clients)
        image = await asyncio.to_thread(
            seed_random_image, self.registry.url, f"cold{number}", LAYER_SIZE, number
        )
        client = Puller(self.load.session, process.url)
        self.own_clients.append(client)
        # The manifest, the config, then the layer: its download is under way when the
        # fake hub sees the layer asked for.
        task = asyncio.create_task(self.load.pull(client, image))
        self.leading.append(task)
        await until("the upstream fetch", lambda: layer_fetch_begun(self.hub, image))
        self.load.images.append(image)
        await until("pullers on the cold layer", lambda: self._joined(image))
        return task

    async def _joined(self, image: RandomImage) -> bool:
        """Two pullers began the layer, besides the leading replica's own client."""
        return self.load.started[image.layer_digest] >= 3


async def roll(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    registry: DistributionRegistry,
    hub: FakeHubProcess,
    rgw: CephRGW,
    bucket: str,
    trees: dict[str, Path],
    stack: ExitStack,
    session: aiohttp.ClientSession,
    releases: tuple[str, str],
) -> tuple[Load, Roll]:
    """Three replicas on `releases[0]`, pulled from without pause while each is replaced by
    one on `releases[1]`; the load and the roll, to assert on."""
    shared = {
        "redis": {"url": flushed_redis_url(request, "single")},
        "storage": s3_section(rgw, bucket),
    }
    replicas = start_replicas(stack, tmp_path, hub, shared, trees, releases[0])
    balancer = HAProxy(
        tmp_path / "lb", [r.process.url for r in replicas],
        check_path="/readyz", check_interval_ms=CHECK_INTERVAL_MS, redispatch=True,
    )  # fmt: skip
    stack.enter_context(balancer)
    warm = [seed_random_image(registry.url, f"warm{n}", LAYER_SIZE, seed=100 + n) for n in range(2)]
    load = Load(session, balancer.url, warm)
    rolling = Roll(registry, hub, load)
    pulling = asyncio.create_task(load.run())
    try:
        for replica in replicas:
            await rolling.replace(replica, releases[1])
        await asyncio.gather(*rolling.leading)
        await until("every image pulled", load.all_pulled_by_all)
    finally:
        for task in rolling.leading:
            task.cancel()
        load.stopping.set()
        await pulling
    return load, rolling


@pytest.mark.parametrize(
    "releases", [(CURRENT, CURRENT), (PREVIOUS, CURRENT)], ids=["restart", "update"]
)
async def test_a_rolling_restart_under_load_loses_no_pull_and_fetches_each_digest_once(
    request: pytest.FixtureRequest,
    releases: tuple[str, str],
    tmp_path: Path,
    registry: DistributionRegistry,
    hub: FakeHubProcess,
    rgw: CephRGW,
    s3_bucket: str,
    trees: dict[str, Path],
    stack: ExitStack,
    session: aiohttp.ClientSession,
) -> None:
    """`restart`: this release restarted in turn; `update`: the previous release replaced
    by this one in turn, the two side by side on one Redis and one bucket meanwhile."""
    load, rolling = await roll(
        request, tmp_path, registry, hub, rgw, s3_bucket, trees, stack, session, releases
    )
    errors = load.errors + [error for client in rolling.own_clients for error in client.errors]
    assert errors == []
    # Each replica closed its listener with its download still in flight, then exited by
    # itself once that was done; clients kept sending requests meanwhile.
    assert rolling.in_flight_at_close == [True] * REPLICAS
    assert rolling.exits == [0] * REPLICAS
    assert all(rolling.requests_while_stopping), rolling.requests_while_stopping
    stats = hub.stats()
    # Every blob a client got, the cold ones pulled across a restart among them, came
    # from the upstream once; nothing else was fetched.
    assert stats["cdn_get_by_digest"] == dict.fromkeys(load.blobs, 1)
    # One manifest GET per image (401 challenges are not counted: nothing was sent), and
    # every image's was asked: so each once. A tag is HEADed first (no pull spent) by
    # replicas of this release, once each at most; the release updated from does not.
    assert stats["manifest_get"] == len(load.images)
    assert stats["manifest_head"] <= len(load.images)
    asked = {path for _, method, path in stats["requests"] if method == "GET"}
    assert {f"/v2/{image.repo}/manifests/latest" for image in load.images} <= asked
