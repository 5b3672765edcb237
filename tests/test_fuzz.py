"""The registry API under a seeded fuzz: thousands of hostile requests against a mirror with
content cached, bare and with pull policies and client auth.

Every answer must be below 500 (the fake upstream is healthy), every refusal of a GET must
carry an OCI error body with a known code, no answer may show a server path, a traceback or
a password, and afterwards the cache directory holds nothing outside its layout.
Set MIRROR_FUZZ_SEED to replay another sequence; a failure names the seed it ran with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.test_utils import TestClient

from mirror.config import Config
from mirror.storage.filesystem import USERS_LOCK
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.fuzzing import Corpus, Fuzzer
from tests.rawhttp import Answer, Request, exchange
from tests.test_pull_policy import LISTS, PASSWORDS, auth_with, basic, policy_mirror

Client = TestClient[Any, Any]
SEED = int(os.environ.get("MIRROR_FUZZ_SEED", "17"))
# The OCI distribution spec's codes, and those distribution adds that the mirror uses.
KNOWN_CODES = frozenset(
    {"BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
     "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
     "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED",
     "TOOMANYREQUESTS", "RANGE_INVALID", "PAGINATION_NUMBER_INVALID", "TAG_INVALID",
     "UNAVAILABLE"}
)  # fmt: skip
LEAKS = ["Traceback (most recent call last)", 'File "/', "site-packages", str(Path.cwd())]
ENTRY = re.compile(r"(blobs|manifests)/(sha256|sha512)/([0-9a-f]{2})/([0-9a-f]+)")
HEX_LENGTH = {"sha256": 64, "sha512": 128}
SHOWN_FAILURES = 15


# --- the content the fuzz starts from -----------------------------------------------------------


def add_content(hub: FakeHub) -> Corpus:
    """An image with three tags and an artifact referring to it, on the fake hub."""
    hub.ratelimit_remaining = 10**6  # a healthy upstream: Docker Hub's pull limit is not hit
    image = hub.content.add_image("library/busybox", "latest", [b"layer one" * 500, b"two"])
    hub.content.set_tag("library/busybox", "1.36", image["digest"])
    sbom = hub.content.add_artifact("library/busybox", image["digest"], "text/spdx", b"{}", "s")
    other = hub.content.add_image("library/nginx", "latest-rc1", [b"nginx"])
    names = [
        "library/busybox",
        "busybox",
        "docker.io/library/busybox",
        "library/nginx",
        "index.docker.io/library/busybox",
        "ghcr.io/team/app",
        "someone/app",
        "a/b/c",
    ]
    digests = [image["digest"], image["config"], *image["layers"], sbom, other["digest"]]
    return Corpus(names, ["latest", "1.36", "s", "latest-rc1", "v1", "nope"], digests)


async def pull(client: Client, corpus: Corpus, **headers: str) -> None:
    """Cache the busybox image the way a client pulls it: manifest by tag, then blobs (the
    first `names` and `digests` of the corpus, which the fuzz asks for most)."""
    for path in ["/v2/library/busybox/manifests/latest", "/v2/library/busybox/tags/list"]:
        resp = await client.get(path, headers=headers)
        assert resp.status == 200, await resp.text()
    for digest in corpus.digests[1:4]:
        resp = await client.get(f"/v2/library/busybox/blobs/{digest}", headers=headers)
        assert resp.status == 200, await resp.text()
    resp = await client.get(f"/v2/library/busybox/referrers/{corpus.digests[0]}", headers=headers)
    assert resp.status == 200, await resp.text()


# --- what every answer must satisfy ------------------------------------------------------------


def oci_error_problem(body: bytes) -> str | None:
    """What is wrong with an error body, or None when it is a well-formed OCI one."""
    try:
        errors = json.loads(body)["errors"]
    except (ValueError, KeyError, TypeError):
        return "no OCI error body"
    if not isinstance(errors, list) or not errors:
        return "an empty or non-list `errors`"
    for entry in errors:
        if not isinstance(entry, dict) or not isinstance(entry.get("message"), str):
            return "an error entry without a message"
        if entry.get("code") not in KNOWN_CODES:
            return f"an unknown error code {entry.get('code')!r}"
    return None


def unrouted_expectation(request: Request, answer: Answer) -> bool:
    """aiohttp's plain-text 417 for an odd `Expect` on a path outside the API that no route
    of the mirror's matches: it answers before any of the mirror's code (or expect handler)
    runs. Every path under /v2/ has a route, and so an OCI body."""
    path = urlsplit(request.target).path if "://" in request.target else request.target
    return answer.status == 417 and not path.startswith("/v2/")


def problems(request: Request, answer: Answer, secrets: list[str]) -> list[str]:
    found = []
    if answer.status == 0:
        return ["the connection closed without an answer"]
    if request.malformed and answer.status != 400:
        found.append("a request the HTTP grammar refuses is not a 400")
    if answer.status >= 500:
        found.append("a 5xx from a mirror in front of a healthy upstream")
    refused = answer.status >= 400 and not request.malformed and request.method != "HEAD"
    if refused and not unrouted_expectation(request, answer):
        problem = oci_error_problem(answer.body)
        if problem is not None:
            found.append(problem)
    shown = answer.body.decode("utf-8", "replace") + "".join(answer.headers.values())
    found += [f"the answer shows {secret!r}" for secret in secrets if secret in shown]
    return found


async def run_fuzz(client: Client, corpus: Corpus, count: int, secrets: list[str]) -> Counter[int]:
    """Send `count` requests from the seed; fail naming the seed and the first offenders."""
    requests = Fuzzer(SEED, corpus).requests(count)
    statuses: Counter[int] = Counter()
    failures = []
    started = time.monotonic()
    for index, request in enumerate(requests):
        answer = await exchange(client.host, client.port, request)
        statuses[answer.status] += 1
        for problem in problems(request, answer, [*LEAKS, *secrets]):
            shown = f"{answer.status} {answer.body[:300]!r}"
            failures.append(f"#{index} {problem}: {request}\n  -> {shown}")
    took = time.monotonic() - started
    print(f"fuzz seed {SEED}: {count} requests in {took:.1f}s, statuses {dict(statuses)}")
    assert not failures, f"MIRROR_FUZZ_SEED={SEED}: {len(failures)} failures\n" + "\n".join(
        failures[:SHOWN_FAILURES]
    )
    return statuses


def unexpected_errors(records: list[logging.LogRecord]) -> list[str]:
    """ERROR lines other than aiohttp's parser refusing what the fuzz meant it to refuse."""
    unexpected = []
    for record in records:
        if record.levelno < logging.ERROR or record.name.startswith("tests"):
            continue
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            unexpected.append(f"{record.name}: {record.getMessage()} {exc!r}")
    return unexpected


def digest_of_file(algorithm: str, path: Path) -> str:
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


def outside_layout(data: Path) -> list[str]:
    """Files under the cache directory that its layout does not name, or whose bytes do
    not hash to their name."""
    strays = []
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        relative = path.relative_to(data).as_posix()
        entry = ENTRY.fullmatch(relative)
        if entry is not None:
            kind, algorithm, prefix, hexpart = entry.groups()
            if len(hexpart) != HEX_LENGTH[algorithm] or not hexpart.startswith(prefix):
                strays.append(relative)
            elif kind == "blobs" and digest_of_file(algorithm, path) != hexpart:
                strays.append(f"{relative} (bytes of another digest)")
        elif relative not in ("metadata.json", "auth/signing.key", USERS_LOCK):
            strays.append(relative)
    return strays


# --- the runs -----------------------------------------------------------------------------------


@pytest.fixture
async def ghcr() -> AsyncIterator[FakeHub]:
    async with FakeHub() as fake:
        yield fake


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    import bcrypt

    path = tmp_path / "htpasswd"
    hashed = {user: bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)) for user, pw in PASSWORDS.items()}
    path.write_text("".join(f"{user}:{pw.decode()}\n" for user, pw in hashed.items()))
    return path


async def test_fuzz_a_mirror_with_content_cached(
    client: Client, hub: FakeHub, config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = add_content(hub)
    await pull(client, corpus)
    caplog.set_level(logging.WARNING)
    statuses = await run_fuzz(client, corpus, 3000, [str(tmp_path)])
    assert statuses[200] > 100 and statuses[206] > 0 and statuses[304] > 0  # it reached content
    assert unexpected_errors(caplog.records) == []
    assert outside_layout(config.storage.path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


async def test_fuzz_a_mirror_with_pull_policies_and_client_auth(
    make_client: MakeClient,
    hub: FakeHub,
    ghcr: FakeHub,
    htpasswd: Path,
    config: Config,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    corpus = add_content(hub)
    ghcr.content.add_image("team/app", "v1", [b"team layer"])
    client = await policy_mirror(make_client, hub, ghcr, docker_io=LISTS, auth=auth_with(htpasswd))
    await pull(client, corpus, **basic("alice"))
    corpus.passwords = dict(PASSWORDS)
    for user in ("alice", "bob"):
        scope = "repository:library/busybox:pull repository:someone/app:pull"
        # Tokens are for one service: the name the fuzzed requests address (rawhttp's Host).
        headers = {**basic(user), "Host": "mirror.test"}
        resp = await client.get("/token", params={"scope": scope}, headers=headers)
        corpus.tokens.append((await resp.json())["token"])
    caplog.set_level(logging.WARNING)
    statuses = await run_fuzz(client, corpus, 2500, [str(tmp_path), *PASSWORDS.values()])
    assert statuses[200] > 50 and statuses[401] > 0 and statuses[403] > 0
    assert unexpected_errors(caplog.records) == []
    assert outside_layout(config.storage.path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "htpasswd"]
