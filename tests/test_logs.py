"""Logs: text or JSON lines, a request id on every record and response, one access line per
request, and never a credential.

The formatter is checked in-process with a captured stream; everything else against real
`python -m mirror serve` processes, whose stdout and stderr are their log file:

    urllib ──> mirror (log.format json|text) ──> fake hub process ──> docker-registry
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.observe.logs import (
    _sole_line_handler,
    log_request_line,
    new_request_id,
    request_id_var,
    setup_logging,
)
from mirror.web.accesslog import ACCESS_FORMAT
from tests.e2e.clients_helpers import JWT, write_htpasswd
from tests.fakehub import FakeHub
from tests.images import DOCKER_MANIFEST, Image, busybox_image, file_layer, push_image
from tests.images import single_image as build_single_image
from tests.rawclient import Client as RawClient
from tests.rawclient import Endpoint
from tests.resilience_helpers import metric_value
from tests.services import DistributionRegistry, FakeHubProcess, MirrorProcess

HEX16 = re.compile(r"^[0-9a-f]{16}$")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"debug", "info", "warning", "error", "critical"}
LOG_WAIT = 10.0
USER, PASSWORD = "user", "s3cret"
BASIC = "Basic dXNlcjpzM2NyZXQ="  # user:s3cret
assert BASIC == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
BEARER_SECRET = "tok-9f8e7d6c5b4a-Zq"
WRONG_PASSWORD = "wr0ng-Pa55-Lq7"
# What any credential looks like in a header value: a scheme, then a long opaque word.
CREDENTIAL = re.compile(r"(?i)\b(?:basic|bearer)\s+[A-Za-z0-9._~+/-]{8,}=*")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- the formatter, in-process ------------------------------------------------------------


@pytest.fixture
def captured_log() -> Iterator[Callable[[str, str], io.StringIO]]:
    """setup_logging() with its handler writing to a StringIO; the root logger restored."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level

    def setup(level: str, fmt: str) -> io.StringIO:
        setup_logging(level, fmt)
        stream = io.StringIO()
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        return stream

    yield setup
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def test_json_format(captured_log: Callable[[str, str], io.StringIO]) -> None:
    stream = captured_log("INFO", "json")
    log = logging.getLogger("mirror.test")
    log.info("outside any request")
    token = request_id_var.set("req-1")
    try:
        log.warning("inside %s", "a request", extra={"access": {"method": "GET", "status": 200}})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")
        log.debug("not at INFO")
    finally:
        request_id_var.reset(token)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    for entry in lines:
        assert {"time", "level", "logger", "message", "request_id"} <= entry.keys()
        assert ISO_UTC.match(entry["time"]), entry["time"]
        assert entry["logger"] == "mirror.test"
    assert [e["request_id"] for e in lines] == ["-", "req-1", "req-1"]
    assert [e["level"] for e in lines] == ["info", "warning", "error"]
    assert lines[1]["message"] == "inside a request"
    assert (lines[1]["method"], lines[1]["status"]) == ("GET", 200)
    assert "ValueError: boom" in lines[2]["exception"]


# A request's one line, as hostile as a client can make it: controls that would end the
# line, a credential's name in the request id and the path, a non-ASCII user agent.
HOSTILE_ARGS = ("10.0.0.1", "GET", "/v2/a\nb/token=abc\x1b[2J", 200, 5, 0.25, "hub", "ua\u2028é")
HOSTILE_ID = "token:abc-1"


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("worker", [None, 3])
def test_a_request_line_written_direct_is_the_records_line(
    fmt: str, worker: int | None, captured_log: Callable[[str, str], io.StringIO]
) -> None:
    """The one line of a request goes straight into setup_logging's handler (no record):
    it must be, byte for byte but the time, the line the record would have made."""
    stream = captured_log("INFO", fmt)
    root = logging.getLogger()
    setup_logging("INFO", fmt, worker)
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    logger = logging.getLogger("mirror.audit")

    def access() -> dict[str, Any]:
        return {"method": "GET", "path": HOSTILE_ARGS[2], "status": 200}

    assert _sole_line_handler(logger) is root.handlers[0]  # the direct path is taken
    log_request_line(logger, ACCESS_FORMAT, HOSTILE_ARGS, access, HOSTILE_ID)
    logger.addFilter(lambda record: True)  # anything added: the standard way
    try:
        assert _sole_line_handler(logger) is None
        log_request_line(logger, ACCESS_FORMAT, HOSTILE_ARGS, access, HOSTILE_ID)
    finally:
        logger.filters.clear()
    direct, recorded = stream.getvalue().splitlines()
    if fmt == "json":
        first, second = json.loads(direct), json.loads(recorded)
        assert first.pop("time") and second.pop("time")
        assert first == second and first["request_id"] == HOSTILE_ID
        assert first.get("worker") == worker and "abc" not in first["message"]
    else:
        assert direct.split(" ", 2)[2] == recorded.split(" ", 2)[2]
        assert "\\n" in direct and "\n" not in direct  # the path's newline escaped
        assert "abc" not in direct and ("worker=3" in direct) == (worker == 3)
    assert request_id_var.get() == "-"  # the standard way's id does not leak out


class CountedWrites(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_the_request_lines_of_one_loop_turn_go_out_in_one_write_and_in_order(
    captured_log: Callable[[str, str], io.StringIO],
) -> None:
    captured_log("INFO", "text")
    stream = CountedWrites()
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    audit, other = logging.getLogger("mirror.audit"), logging.getLogger("mirror.test")

    def line(n: int) -> None:
        args = ("10.0.0.1", "GET", f"/v2/r/manifests/{n}", 200, 5, 0.1, "hub", "ua")
        log_request_line(audit, ACCESS_FORMAT, args, dict, f"id-{n}")

    for n in range(5):
        line(n)
    assert stream.writes == 0  # kept until the turn ends
    await asyncio.sleep(0)
    assert stream.writes == 1 and stream.getvalue().count("\n") == 5
    line(5)
    other.warning("a record the standard way")  # after line 5, before line 6
    line(6)
    await asyncio.sleep(0)
    order = [text.rsplit(" ", 1)[-1] for text in stream.getvalue().splitlines()]
    assert order[5:] == ['"ua"', "way", '"ua"'] and "/5" in stream.getvalue().splitlines()[5]


def test_text_format(captured_log: Callable[[str, str], io.StringIO]) -> None:
    stream = captured_log("INFO", "text")
    log = logging.getLogger("mirror.test")
    log.info("before")
    token = request_id_var.set("abc-123")
    try:
        log.info("during")
    finally:
        request_id_var.reset(token)
    before, during = stream.getvalue().splitlines()
    assert " INFO mirror.test [-] before" in before
    assert " INFO mirror.test [abc-123] during" in during


@pytest.mark.parametrize("incoming", ["abc-123", "A.b_c:1", "x" * 64])
def test_sane_request_ids_are_kept(incoming: str) -> None:
    assert new_request_id(incoming) == incoming


@pytest.mark.parametrize("incoming", [None, "", "x" * 65, 'a"b', "a b", "a\nb", "a}{", "ü", "%0a"])
def test_other_request_ids_are_replaced(incoming: str | None) -> None:
    assert HEX16.match(new_request_id(incoming))


# --- real processes -----------------------------------------------------------------------


@dataclass
class Upstream:
    hub: FakeHubProcess
    busybox: Image
    corruptible: Image


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def upstream(logs_dir: Path) -> Iterator[Upstream]:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed")
    with DistributionRegistry(logs_dir / "registry") as registry:
        busybox = busybox_image()
        corruptible = build_single_image("corruptible", [file_layer("c.txt", "corrupt me\n")])
        push_image(registry.url, "library/busybox", "latest", busybox)
        push_image(registry.url, "library/corruptible", "latest", corruptible)
        with FakeHubProcess(registry.url, workdir=logs_dir / "fakehub") as hub:
            yield Upstream(hub, busybox, corruptible)


def mirror_with_config(workdir: Path, upstream: str, config: dict[str, Any]) -> MirrorProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "mirror.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return MirrorProcess(workdir, upstream, extra_args=["--config", str(path)])


@pytest.fixture(scope="module")
def json_mirror(logs_dir: Path, upstream: Upstream) -> Iterator[MirrorProcess]:
    """JSON logs at DEBUG: the most a log shipper would ever get to see."""
    config = {"log": {"format": "json", "level": "debug"}}
    with mirror_with_config(logs_dir / "json", upstream.hub.registry_url, config) as mirror:
        yield mirror


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def request(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> Answer:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=30) as resp:
            return Answer(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return Answer(err.code, err.headers, err.read())


def log_lines(mirror: MirrorProcess) -> list[str]:
    """The mirror's own lines (the test harness's `--- start:` markers left out)."""
    text = mirror.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if line and not line.startswith("--- start:")]


def json_records(mirror: MirrorProcess) -> list[dict[str, Any]]:
    records = []
    for line in log_lines(mirror):
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line in {mirror.log_path}: {line[:300]!r}")
    return records


ACCESS_LOGGERS = ("aiohttp.access", "mirror.audit")


def wait_for_access(mirror: MirrorProcess, request_id: str) -> list[dict[str, Any]]:
    """The records of a request id holding its access fields (written just after the
    response went out): its access line, or a manifest request's audit line."""
    deadline = time.monotonic() + LOG_WAIT
    while True:
        found = [
            record
            for record in json_records(mirror)
            if record.get("request_id") == request_id and record["logger"] in ACCESS_LOGGERS
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.mark.e2e
def test_every_line_is_json_with_the_common_fields(json_mirror: MirrorProcess) -> None:
    assert request(f"{json_mirror.url}/v2/").status == 200
    assert request(f"{json_mirror.url}/v2/library/nope/manifests/latest").status == 404
    request_id = request(f"{json_mirror.url}/healthz").headers["X-Request-ID"]
    assert wait_for_access(json_mirror, request_id)
    records = json_records(json_mirror)
    assert len(records) >= 4
    for record in records:
        missing = {"time", "level", "logger", "message", "request_id"} - record.keys()
        assert not missing, f"{missing} missing from {record}"
        assert ISO_UTC.match(record["time"]), record
        assert record["level"] in LEVELS, record
        assert isinstance(record["message"], str) and record["message"], record
    started = [r for r in records if r["logger"] == "mirror.cli" and "serving on" in r["message"]]
    assert started and started[0]["request_id"] == "-"


@pytest.mark.e2e
def test_one_access_line_per_request(json_mirror: MirrorProcess, upstream: Upstream) -> None:
    layer = upstream.busybox.host_layers[0]
    manifest = "/v2/library/busybox/manifests/latest"
    blob = f"/v2/library/busybox/blobs/{layer.digest}"
    accept = {"Accept": DOCKER_MANIFEST}
    calls = [
        ("GET", "/v2/", {}, 200),
        ("GET", manifest, accept, 200),
        ("HEAD", manifest, accept, 200),
        ("GET", blob, {}, 200),
        ("HEAD", blob, {}, 200),
        ("GET", "/v2/library/busybox/manifests/no-such-tag", accept, 404),
        ("DELETE", manifest, {}, 405),
        ("GET", "/", {}, 200),
        ("GET", "/metrics", {}, 200),
    ]
    for index, (method, path, headers, status) in enumerate(calls):
        request_id = f"each-{index}"
        answer = request(json_mirror.url + path, method, {**headers, "X-Request-ID": request_id})
        assert answer.status == status, (method, path, answer.body[:300])
        assert answer.headers["X-Request-ID"] == request_id
        found = wait_for_access(json_mirror, request_id)
        assert len(found) == 1, f"{method} {path}: {len(found)} access lines"
        access = found[0]
        audited = "/manifests/" in path and method != "DELETE"
        assert access["logger"] == ACCESS_LOGGERS[audited], access
        assert (access["method"], access["path"], access["status"]) == (method, path, status)
        # How many: test_access_line_counts_the_body_bytes.
        assert isinstance(access["bytes"], int)
        assert access["bytes"] == 0 if method == "HEAD" else access["bytes"] > 0  # body bytes
        assert isinstance(access["duration_s"], float) and 0 <= access["duration_s"] < 30
        assert access["level"] == "info"


@pytest.mark.e2e
def test_access_line_counts_the_body_bytes(json_mirror: MirrorProcess, upstream: Upstream) -> None:
    """A 1 MiB layer, streamed from upstream and then sent from the cache: the access line
    says that many bytes went out, not just the headers."""
    layer = upstream.busybox.host_layers[0]
    assert layer.size > 512 * 1024
    url = f"{json_mirror.url}/v2/library/busybox/blobs/{layer.digest}"
    sent = {}
    for attempt in ("first", "second"):
        answer = request(url, headers={"X-Request-ID": f"bytes-{attempt}"})
        assert answer.status == 200 and len(answer.body) == layer.size
        (access,) = wait_for_access(json_mirror, f"bytes-{attempt}")
        sent[attempt] = access["bytes"]
    assert all(n >= layer.size for n in sent.values()), (
        f"access lines say {sent} bytes for a {layer.size}-byte blob"
    )


@pytest.mark.e2e
def test_client_request_id_comes_back(json_mirror: MirrorProcess) -> None:
    answer = request(
        f"{json_mirror.url}/v2/library/busybox/manifests/latest",
        headers={"X-Request-ID": "abc-123", "Accept": DOCKER_MANIFEST},
    )
    assert answer.status == 200
    assert answer.headers["X-Request-ID"] == "abc-123"
    (access,) = wait_for_access(json_mirror, "abc-123")
    assert access["path"] == "/v2/library/busybox/manifests/latest"


@pytest.mark.e2e
@pytest.mark.parametrize("sent", [None, 'bad"id', "x" * 65], ids=["none", "quote", "too-long"])
def test_request_id_generated_otherwise(json_mirror: MirrorProcess, sent: str | None) -> None:
    headers = {} if sent is None else {"X-Request-ID": sent}
    first = request(f"{json_mirror.url}/v2/", headers=headers).headers["X-Request-ID"]
    second = request(f"{json_mirror.url}/v2/", headers=headers).headers["X-Request-ID"]
    assert HEX16.match(first) and HEX16.match(second), (first, second)
    assert first != second
    for request_id in (first, second):
        (access,) = wait_for_access(json_mirror, request_id)
        assert access["path"] == "/v2/"
    if sent is not None:
        assert not any(sent in line for line in log_lines(json_mirror))


@pytest.mark.e2e
def test_records_logged_during_a_request_carry_its_id(
    json_mirror: MirrorProcess, upstream: Upstream
) -> None:
    """A blob whose upstream bytes do not match its digest: the warnings about it are
    stamped with the id of the request that asked for it."""
    layer = upstream.corruptible.host_layers[0]
    knobs = urllib.request.Request(
        f"{upstream.hub.registry_url}/_knobs",
        data=json.dumps({"corrupt_blobs": [layer.digest]}).encode(),
        method="POST",
    )
    with _OPENER.open(knobs, timeout=10):
        pass
    try:
        url = f"{json_mirror.url}/v2/library/corruptible/blobs/{layer.digest}"
        try:
            answer = request(url, headers={"X-Request-ID": "corrupt-1"})
            assert answer.status != 200 or len(answer.body) != layer.size
        except (http.client.HTTPException, OSError):
            pass  # the mirror cut the connection: the honest answer to bad bytes
    finally:
        reset = urllib.request.Request(
            f"{upstream.hub.registry_url}/_knobs",
            data=json.dumps({"corrupt_blobs": []}).encode(),
            method="POST",
        )
        with _OPENER.open(reset, timeout=10):
            pass
    (access,) = wait_for_access(json_mirror, "corrupt-1")
    # The transfer was cut: its access line must not claim the whole blob went out.
    assert access["bytes"] < layer.size, access
    warnings = [
        record
        for record in json_records(json_mirror)
        if record["level"] in ("warning", "error")
        and (layer.digest in record["message"] or record["request_id"] == "corrupt-1")
    ]
    assert warnings, "nothing was logged about the corrupt blob"
    assert {r["request_id"] for r in warnings} == {"corrupt-1"}, warnings


@pytest.mark.e2e
def test_text_format_lines_carry_the_request_id(tmp_path: Path, upstream: Upstream) -> None:
    config = {"log": {"format": "text"}}
    with mirror_with_config(tmp_path / "text", upstream.hub.registry_url, config) as mirror:
        answer = request(f"{mirror.url}/v2/", headers={"X-Request-ID": "text-42"})
        generated = request(f"{mirror.url}/v2/_catalog").headers["X-Request-ID"]
        deadline = time.monotonic() + LOG_WAIT
        while time.monotonic() < deadline and not any(
            generated in line for line in log_lines(mirror)
        ):
            time.sleep(0.05)
        lines = log_lines(mirror)
    assert answer.headers["X-Request-ID"] == "text-42"
    (mine,) = [line for line in lines if "[text-42]" in line]
    assert '"GET /v2/" 200' in mine and " aiohttp.access " in mine
    assert [line for line in lines if f"[{generated}]" in line and "/v2/_catalog" in line]
    startup = [line for line in lines if "serving on" in line]
    assert startup and "[-]" in startup[0]
    for line in lines:
        assert not line.lstrip().startswith("{"), f"a JSON line in a text log: {line}"


@pytest.mark.e2e
def test_no_credential_reaches_the_log(
    tmp_path: Path, json_mirror: MirrorProcess, upstream: Upstream
) -> None:
    """Basic and Bearer credentials, right and wrong, sent to a mirror without client auth
    and to one with htpasswd auth: none of them, nor a token the mirror issued, is logged."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})
    config = {"log": {"format": "json", "level": "debug"}, "auth": {"htpasswd": str(htpasswd)}}
    wrong_basic = "Basic " + base64.b64encode(f"{USER}:{WRONG_PASSWORD}".encode()).decode()
    manifest = "/v2/library/busybox/manifests/latest"
    blob = f"/v2/library/busybox/blobs/{upstream.busybox.host_layers[0].digest}"
    accept = {"Accept": DOCKER_MANIFEST}

    # No client auth: the headers are ignored, and must not be logged either.
    for path in ("/v2/", manifest, f"{manifest}?password={PASSWORD}"):
        for header in (BASIC, f"Bearer {BEARER_SECRET}", wrong_basic):
            answer = request(json_mirror.url + path, headers={**accept, "Authorization": header})
            assert answer.status == 200, (path, answer.body[:300])
    with mirror_with_config(tmp_path / "auth", upstream.hub.registry_url, config) as mirror:
        assert request(f"{mirror.url}/v2/").status == 401
        scope = "repository:library/busybox:pull"
        answer = request(f"{mirror.url}/token?scope={scope}", headers={"Authorization": BASIC})
        assert answer.status == 200, answer.body
        issued = json.loads(answer.body)["token"]
        bearer = {"Authorization": f"Bearer {issued}"}
        assert request(mirror.url + manifest, headers={**accept, **bearer}).status == 200
        assert request(mirror.url + blob, headers=bearer).status == 200
        ok = request(mirror.url + manifest, headers={**accept, "Authorization": BASIC})
        assert ok.status == 200
        for header in (wrong_basic, f"Bearer {BEARER_SECRET}", f"Bearer {issued}x"):
            answer = request(mirror.url + manifest, headers={**accept, "Authorization": header})
            assert answer.status == 401, header
        answer = request(f"{mirror.url}/token", headers={"Authorization": wrong_basic})
        assert answer.status == 401
        request_id = request(f"{mirror.url}/healthz").headers["X-Request-ID"]
        assert wait_for_access(mirror, request_id)
        auth_log = mirror.log_path.read_text(errors="replace")
    wait_for_access(json_mirror, request(f"{json_mirror.url}/healthz").headers["X-Request-ID"])
    plain_log = json_mirror.log_path.read_text(errors="replace")

    secrets = {
        "password": PASSWORD,
        "Basic credentials": BASIC.removeprefix("Basic "),
        "wrong password": WRONG_PASSWORD,
        "wrong Basic credentials": wrong_basic.removeprefix("Basic "),
        "bearer token": BEARER_SECRET,
        "issued token": issued,
        "issued token's signature": issued.rsplit(".", 1)[-1],
    }
    for name, text in (("mirror without auth", plain_log), ("mirror with auth", auth_log)):
        found = [what for what, secret in secrets.items() if secret in text]
        found += [f"a JWT: {jwt[:24]}..." for jwt in JWT.findall(text)]
        found += CREDENTIAL.findall(text)
        assert not found, f"the log of the {name} holds: {found}"


# --- cut transfers: a mirror process in front of the in-process fake hub ---------------------


async def access_record(mirror: MirrorProcess, request_id: str) -> dict[str, Any]:
    """The one access record of `request_id`, once written."""
    for _ in range(int(LOG_WAIT / 0.05)):
        found = [
            record
            for record in json_records(mirror)
            if record.get("request_id") == request_id and record["logger"] in ACCESS_LOGGERS
        ]
        if found:
            (record,) = found
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"no access record for {request_id}")


async def served_from_cache(mirror: MirrorProcess) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{mirror.url}/metrics") as resp:
            text = await resp.text()
    return metric_value(text, "mirror_served_bytes_total", {"source": "cache"}) or 0.0


async def test_a_cut_transfer_is_logged_and_counted_with_the_bytes_it_sent(
    tmp_path: Path, hub: FakeHub
) -> None:
    """A client leaves part way through a large cached blob: its access line and the
    served-bytes metric hold the bytes that went out, not none of them."""
    layer = os.urandom(80 * 1024 * 1024)
    path = f"/v2/library/app/blobs/{hub.content.add_blob(layer)}"
    config = {"log": {"format": "json"}}
    mirror = mirror_with_config(tmp_path / "mirror", hub.registry_url, config)
    await asyncio.to_thread(mirror.start)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(mirror.url + path) as resp:
                assert await resp.read() == layer
        before = await served_from_cache(mirror)
        # A connection with a small fixed window (tests/rawclient.py) that reads 10 MB.
        raw = await RawClient.open(Endpoint(mirror.port), rcvbuf=64 * 1024)
        read = 10 * 1024 * 1024
        try:
            status, _ = await raw.ask(path, "X-Request-ID: cut-1\r\n")
            assert status == 200
            assert len(await raw.reader.readexactly(read)) == read
        finally:
            await raw.close()
        record = await access_record(mirror, "cut-1")
        served = await served_from_cache(mirror) - before
    finally:
        await asyncio.to_thread(mirror.stop)
    # What the client read, and at most what the sockets' buffers held besides.
    assert read <= record["bytes"] <= read + 16 * 1024 * 1024, record
    assert served == record["bytes"]


async def test_a_transfer_cut_by_the_mirror_says_so_in_its_access_line_and_metric(
    tmp_path: Path, hub: FakeHub
) -> None:
    """A blob whose bytes fail their digest is cut after its 200 went out: the access line
    says `outcome=aborted` (the status alone says all went well), and the request counts
    as aborted, not as a 200."""
    digest = hub.content.add_blob(os.urandom(2 * 1024 * 1024))
    hub.corrupt_blobs.add(digest)
    path = f"/v2/library/app/blobs/{digest}"
    aborted = {"route": "blob", "method": "GET", "status": "aborted"}
    for fmt in ("json", "text"):
        mirror = mirror_with_config(tmp_path / fmt, hub.registry_url, {"log": {"format": fmt}})
        await asyncio.to_thread(mirror.start)
        try:
            async with aiohttp.ClientSession() as session:
                headers = {"X-Request-ID": f"corrupt-{fmt}"}
                async with session.get(mirror.url + path, headers=headers) as resp:
                    assert resp.status == 200
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await resp.read()
            if fmt == "json":
                record = await access_record(mirror, "corrupt-json")
                assert (record["status"], record["outcome"]) == (200, "aborted"), record
            else:
                (line,) = await _access_lines(mirror, "[corrupt-text]")
                assert line.endswith(" outcome=aborted"), line
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{mirror.url}/metrics") as resp:
                    metrics = await resp.text()
        finally:
            await asyncio.to_thread(mirror.stop)
        # Counted before the access line is written.
        assert metric_value(metrics, "mirror_http_requests_total", aborted) == 1


async def _access_lines(mirror: MirrorProcess, request_id: str) -> list[str]:
    """The text access lines holding `request_id`, once written."""
    for _ in range(int(LOG_WAIT / 0.05)):
        found = [line for line in log_lines(mirror)
                 if request_id in line and " aiohttp.access " in line]  # fmt: skip
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}")
