"""`mirror warm`, `ls`, `gc` and `verify`: in-process against the fake hub, and the CLI as a
subprocess (exit statuses, one-line errors, an image list from a file).

The in-process tests call the command functions with the `config` fixture, which points at
the fake hub and caches under tmp_path; a mirror app started afterwards on the same storage
must then answer the warmed image without asking the hub anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from mirror import commands
from mirror.commands import ImageRef, parse_image
from mirror.config import Config
from mirror.config.s3 import S3Config
from mirror.oci.errors import RegistryError
from mirror.oci.reference import parse_digest
from mirror.storage import Storage
from mirror.web.keys import storage_key
from tests.conftest import MakeClient
from tests.fakehub import OCI_MANIFEST, FakeHub
from tests.resilience_helpers import MountError, read_only
from tests.services import _python_env, free_port

DIGEST_A = "sha256:" + "a" * 64
SUMMARY = re.compile(
    r"^warmed (\d+)/(\d+) images: (\d+) manifests, (\d+) blobs \((\d+) fetched, "
    r"(\d+) already cached\), [\d.]+ (?:B|KiB|MiB|GiB) fetched in \d+\.\ds$",
    re.MULTILINE,
)
CLI_TIMEOUT = 60.0


# --- parse_image --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nginx", ImageRef(None, "library/nginx", "latest")),
        ("nginx:1.27", ImageRef(None, "library/nginx", "1.27")),
        (f"library/nginx@{DIGEST_A}", ImageRef(None, "library/nginx", DIGEST_A)),
        (f"nginx:1.27@{DIGEST_A}", ImageRef(None, "library/nginx", DIGEST_A)),
        ("owner/img", ImageRef(None, "owner/img", "latest")),
        ("ghcr.io/owner/img:tag", ImageRef("ghcr.io", "owner/img", "tag")),
        ("quay.io/a/b/c:v1", ImageRef("quay.io", "a/b/c", "v1")),
        ("localhost:5000/x", ImageRef("localhost:5000", "x", "latest")),
        ("localhost:5000/x:2", ImageRef("localhost:5000", "x", "2")),
        ("localhost/x:1", ImageRef("localhost", "x", "1")),
        ("docker.io/nginx", ImageRef("docker.io", "library/nginx", "latest")),
        ("docker.io/owner/img:v2", ImageRef("docker.io", "owner/img", "v2")),
        (" nginx \n", ImageRef(None, "library/nginx", "latest")),
    ],
)
def test_parse_image(text: str, expected: ImageRef) -> None:
    assert parse_image(text) == expected


def test_image_ref_prints_as_docker_would_take_it() -> None:
    assert str(parse_image("nginx")) == "library/nginx:latest"
    assert str(parse_image(f"ghcr.io/o/i@{DIGEST_A}")) == f"ghcr.io/o/i@{DIGEST_A}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Nginx",
        "UPPER/x",
        "ghcr.io/Owner/img",
        "a//b",
        "/nginx",
        "ghcr.io/",
        "docker.io/",
        "nginx@sha256:short",
        "nginx@md5:" + "0" * 32,
        "../../etc/passwd",
    ],
)
def test_parse_image_rejects_bad_names(text: str) -> None:
    with pytest.raises(RegistryError):
        parse_image(text)


@pytest.mark.parametrize(
    "text",
    ["nginx:", "nginx:-x", "nginx:a b", "nginx:" + "t" * 129, "nginx@"],
    ids=["empty-tag", "tag-starts-with-dash", "tag-with-space", "tag-129-chars", "empty-digest"],
)
def test_parse_image_rejects_bad_tags_and_empty_digests(text: str) -> None:
    """A tag the registry grammar refuses (or an empty `@`) is as bad as a bad name."""
    with pytest.raises(RegistryError):
        parse_image(text)


# --- warm ---------------------------------------------------------------------------------


def blob_digests(image: dict[str, Any]) -> list[str]:
    return [image["config"], *image["layers"]]


def cached_blobs(config: Config) -> set[str]:
    """Digests of the blob files under the cache directory."""
    root = config.storage.path / "blobs"
    return {f"{p.parent.parent.name}:{p.name}" for p in root.rglob("*") if p.is_file()}


def summary_of(text: str) -> tuple[int, ...]:
    """(images warmed, images named, manifests, blobs, fetched, already cached)."""
    match = SUMMARY.search(text)
    assert match, f"no summary line in:\n{text}"
    return tuple(int(group) for group in match.groups())


def add_app(hub: FakeHub, repo: str = "library/app", layers: int = 3) -> dict[str, Any]:
    return hub.content.add_image(
        repo, "latest", [f"{repo} layer {i}\n".encode() * (200 + i) for i in range(layers)]
    )


async def test_warm_caches_every_blob_then_finds_them_cached(hub: FakeHub, config: Config) -> None:
    image = add_app(hub)
    out = io.StringIO()
    report = await commands.warm(config, ["library/app:latest"], None, out=out)
    assert report.failures == []
    assert cached_blobs(config) >= set(blob_digests(image))
    assert summary_of(out.getvalue()) == (1, 1, 1, 4, 4, 0)
    assert "library/app:latest: done" in out.getvalue()
    assert hub.stats["cdn_get"] == 4

    hub.reset_stats()
    again = io.StringIO()
    report = await commands.warm(config, ["library/app:latest"], None, out=again)
    assert (report.fetched, report.cached, report.failures) == (0, 4, [])
    assert summary_of(again.getvalue()) == (1, 1, 1, 4, 0, 4)
    assert "4 already cached" in again.getvalue()
    assert (hub.stats["blob_get"], hub.stats["cdn_get"]) == (0, 0), dict(hub.stats)


def add_two_platform_index(hub: FakeHub, repo: str = "library/multi") -> dict[str, list[str]]:
    """An OCI index with a linux/amd64 and a linux/arm64/v8 image; each platform's blobs."""
    amd64 = hub.content.add_image(repo, None, [b"amd64 only layer\n" * 50], OCI_MANIFEST)
    arm64 = hub.content.add_image(repo, None, [b"arm64 only layer\n" * 60], OCI_MANIFEST)
    hub.content.add_index(
        repo,
        "latest",
        [
            (amd64["digest"], OCI_MANIFEST, len(amd64["manifest"]),
             {"os": "linux", "architecture": "amd64"}),
            (arm64["digest"], OCI_MANIFEST, len(arm64["manifest"]),
             {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        ],
    )  # fmt: skip
    return {"linux/amd64": blob_digests(amd64), "linux/arm64": blob_digests(arm64)}


async def test_warm_one_platform_of_an_index(hub: FakeHub, config: Config) -> None:
    platforms = add_two_platform_index(hub)
    out = io.StringIO()
    report = await commands.warm(config, ["library/multi:latest"], "linux/arm64", out=out)
    assert report.failures == []
    cached = cached_blobs(config)
    assert cached >= set(platforms["linux/arm64"])
    assert not cached & set(platforms["linux/amd64"]), "the other platform's blobs were fetched"
    assert set(hub.stats.cdn_get_by_digest) == set(platforms["linux/arm64"])
    # The index and the arm64 image manifest; not the amd64 one.
    assert summary_of(out.getvalue()) == (1, 1, 2, 2, 2, 0)


async def test_cli_warm_fails_an_index_without_the_platform(
    hub: FakeHub, config: Config, tmp_path: Path
) -> None:
    platforms = add_two_platform_index(hub)
    add_app(hub)  # not an index: warmed whole, as before
    code, stdout, stderr = await run_cli(
        "warm", "--upstream", hub.registry_url, "--storage", str(config.storage.path),
        "--platform", "linux/s390x", "library/multi", "library/app", cwd=tmp_path,
    )  # fmt: skip
    assert code == 1, stderr
    assert "library/multi:latest: FAILED: no linux/s390x image in its index" in stdout
    assert summary_of(stdout)[:2] == (1, 2)
    fetched = set(hub.stats.cdn_get_by_digest)
    assert not fetched & set(platforms["linux/amd64"] + platforms["linux/arm64"])


@pytest.mark.parametrize("platform", ["linux", "LINUX/AMD64", "linux/amd64/v8/x", "linux/"])
async def test_cli_warm_refuses_a_malformed_platform(tmp_path: Path, platform: str) -> None:
    code, _, stderr = await run_cli(
        "warm", "--storage", str(tmp_path / "d"), "--upstream", "http://127.0.0.1:9",
        "--platform", platform, "nginx", cwd=tmp_path,
    )  # fmt: skip
    assert code == 2, stderr
    line = one_error_line(stderr)
    assert "--platform" in line and repr(platform) in line
    assert not (tmp_path / "d").exists()


async def test_warm_every_platform_of_an_index_by_default(hub: FakeHub, config: Config) -> None:
    platforms = add_two_platform_index(hub)
    report = await commands.warm(config, ["library/multi:latest"], None, out=io.StringIO())
    assert report.failures == []
    assert report.manifests == 3
    assert cached_blobs(config) >= set(platforms["linux/amd64"] + platforms["linux/arm64"])


async def test_warm_reports_a_missing_image_and_goes_on(hub: FakeHub, config: Config) -> None:
    image = add_app(hub)
    out = io.StringIO()
    report = await commands.warm(
        config, ["library/missing:latest", "library/app:latest"], None, out=out
    )
    assert len(report.failures) == 1
    assert "library/missing:latest" in report.failures[0]
    assert report.images == 1
    assert cached_blobs(config) >= set(blob_digests(image))
    assert summary_of(out.getvalue())[:2] == (1, 2)
    assert "library/missing:latest: FAILED" in out.getvalue()


async def test_warm_reports_an_unmirrored_registry_and_goes_on(
    hub: FakeHub, config: Config
) -> None:
    """ghcr.io is not configured here: that image fails, the next one is still warmed."""
    image = add_app(hub)
    out = io.StringIO()
    report = await commands.warm(
        config, ["ghcr.io/owner/img:1", "library/app:latest"], None, out=out
    )
    assert len(report.failures) == 1
    assert "ghcr.io/owner/img:1" in report.failures[0]
    assert cached_blobs(config) >= set(blob_digests(image))
    assert summary_of(out.getvalue())[:2] == (1, 2)


async def test_warmed_image_is_served_without_upstream_requests(
    hub: FakeHub, config: Config, make_client: MakeClient
) -> None:
    image = add_app(hub)
    report = await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    assert report.failures == []
    assert (config.storage.path / "metadata.json").is_file()

    client = await make_client()  # the same config: the same storage
    hub.reset_stats()
    resp = await client.get("/v2/library/app/manifests/latest")
    assert resp.status == 200, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == image["digest"]
    assert await resp.read() == image["manifest"]
    for digest in blob_digests(image):
        resp = await client.get(f"/v2/library/app/blobs/{digest}")
        assert resp.status == 200, await resp.text()
        body = await resp.read()
        assert hub.content.blobs[digest] == body
    upstream = {key: hub.stats[key] for key in ("manifest_get", "manifest_head", "blob_get")}
    assert upstream == {"manifest_get": 0, "manifest_head": 0, "blob_get": 0}, hub.stats.requests
    assert hub.stats["cdn_get"] == 0
    assert hub.stats.requests == []


# --- ls -----------------------------------------------------------------------------------


async def test_list_cache_prints_tag_digest_and_size(hub: FakeHub, config: Config) -> None:
    image = add_app(hub)
    await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    out = io.StringIO()
    assert await commands.list_cache(config, out) == 1
    total = sum(len(hub.content.blobs[d]) for d in blob_digests(image))
    assert 1024 < total < 1024 * 1024
    lines = [line for line in out.getvalue().splitlines() if "library/app" in line]
    assert len(lines) == 1, out.getvalue()
    fields = lines[0].split()
    assert fields[0].endswith("/library/app")
    assert fields[1] == "latest"
    assert fields[2] == image["digest"][:19]
    assert " ".join(fields[3:]) == f"{total / 1024:.1f} KiB"


async def test_list_cache_of_an_empty_cache(config: Config) -> None:
    out = io.StringIO()
    assert await commands.list_cache(config, out) == 0
    assert "0 tags" in out.getvalue()


# --- gc -----------------------------------------------------------------------------------


async def test_collect_garbage_evicts_least_recently_read_first(
    hub: FakeHub, config: Config
) -> None:
    image = hub.content.add_image(
        "library/big", "latest", [bytes([65 + i]) * 10_000 for i in range(5)]
    )
    await commands.warm(config, ["library/big:latest"], None, out=io.StringIO())
    storage = Storage(config.storage.path)
    # Last read: the config an hour ago, then the layers in order, the last one the newest.
    now = time.time()
    by_age = blob_digests(image)
    for age, digest in zip(range(len(by_age), 0, -1), by_age, strict=True):
        os.utime(storage.blob_path(parse_digest(digest)), (now - age * 600, now - age * 600))
    sizes = {d: len(hub.content.blobs[d]) for d in by_age}
    bound = sizes[by_age[-1]] + sizes[by_age[-2]] + 100  # room for the two newest

    out = io.StringIO()
    freed = await commands.collect_garbage(config, to=bound, out=out)
    left = [d for d in by_age if storage.blob_path(parse_digest(d)).exists()]
    gone = [d for d in by_age if d not in left]
    assert gone == by_age[: len(gone)], "a blob read later was evicted before an older one"
    assert by_age[-1] in left, "the most recently read blob was evicted"
    assert sum(sizes[d] for d in left) <= bound
    assert freed == sum(sizes[d] for d in gone)
    assert f"evicted {len(gone)} blobs" in out.getvalue()

    # Nothing more to do under a bound the cache already fits.
    out = io.StringIO()
    assert await commands.collect_garbage(config, to=10**9, out=out) == 0
    assert "evicted 0 blobs" in out.getvalue()
    assert all(storage.blob_path(parse_digest(d)).exists() for d in left)


# --- verify -------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


async def test_verify_removes_corrupt_files_and_keeps_good_ones(
    hub: FakeHub, config: Config
) -> None:
    image = add_app(hub)
    await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    storage = Storage(config.storage.path)
    bad_blob, *good_blobs = image["layers"] + [image["config"]]
    bad_blob_path = storage.blob_path(parse_digest(bad_blob))
    flip_byte(bad_blob_path, bad_blob_path.stat().st_size // 2)
    manifest_path = storage.manifest_path(parse_digest(image["digest"]))
    media_type_line = manifest_path.read_bytes().index(b"\n") + 1
    flip_byte(manifest_path, media_type_line + 5)  # in the manifest, past its media type
    # Not a digest-named file (an editor's backup, say): not ours to judge.
    stray = bad_blob_path.parent / "notes.txt~"
    stray.write_text("keep me\n")

    out = io.StringIO()
    removed = (await commands.verify(config, out=out)).removed
    assert sorted(removed) == sorted([bad_blob, image["digest"]])
    assert not bad_blob_path.exists()
    assert not manifest_path.exists()
    for digest in good_blobs:
        path = storage.blob_path(parse_digest(digest))
        assert path.read_bytes() == hub.content.blobs[digest]
    assert stray.exists()
    assert f"removed corrupt {bad_blob}" in out.getvalue()
    assert "removed 2 corrupt" in out.getvalue()

    # A second pass finds nothing left to remove.
    assert (await commands.verify(config, out=io.StringIO())).removed == []


async def test_verify_keeps_an_intact_cache(hub: FakeHub, config: Config) -> None:
    image = add_app(hub)
    await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    out = io.StringIO()
    result = await commands.verify(config, out=out)
    assert (result.removed, result.unverified) == ([], None)
    # Four blobs and one manifest.
    assert "verified 5 files, removed 0 corrupt" in out.getvalue()
    assert cached_blobs(config) >= set(blob_digests(image))


def unreachable_bucket(config: Config) -> Config:
    """`config` with a bucket behind its directory at an endpoint nobody listens on."""
    nowhere = S3Config(
        bucket="cache",
        endpoint=f"http://127.0.0.1:{free_port()}",
        access_key_id="key",
        secret_access_key="secret",
    )
    return replace(config, storage=replace(config.storage, s3=nowhere))


async def test_verify_reports_the_local_tier_and_a_bucket_that_does_not_answer(
    hub: FakeHub, config: Config
) -> None:
    """The local tier is verified and reported as ever; the bucket's failure is one line
    after it, and the result says the bucket was not verified."""
    image = add_app(hub)
    await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    bad = image["layers"][0]
    bad_path = Storage(config.storage.path).blob_path(parse_digest(bad))
    flip_byte(bad_path, 0)

    out = io.StringIO()
    result = await commands.verify(unreachable_bucket(config), out=out)
    assert result.removed == [bad]
    assert not bad_path.exists()
    lines = out.getvalue().splitlines()
    assert lines[:2] == [f"removed corrupt {bad}", "verified 5 files, removed 1 corrupt"]
    assert lines[2:] == [result.unverified]
    assert re.fullmatch(
        r"bucket cache not verified: cannot list it \(BucketUnavailable: .+\)", lines[2]
    )


# --- the command line ---------------------------------------------------------------------


async def run_cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    """`python -m mirror ARGS` without blocking this loop (the fake hub runs on it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", *args,
        cwd=cwd, env=_python_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


async def test_cli_warm_without_an_image(tmp_path: Path) -> None:
    code, stdout, stderr = await run_cli("warm", "--storage", str(tmp_path / "d"), cwd=tmp_path)
    assert code == 2, stderr
    line = one_error_line(stderr)
    assert line.startswith("mirror: ") and "--file" in line


async def test_cli_warm_with_a_bad_image_name(tmp_path: Path) -> None:
    code, _, stderr = await run_cli(
        "warm", "--storage", str(tmp_path / "d"), "--upstream", "http://127.0.0.1:9",
        "Bad/Name:1", cwd=tmp_path,
    )  # fmt: skip
    assert code == 2, stderr
    assert "Bad/Name" in one_error_line(stderr)


async def test_cli_gc_without_a_bound(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    code, _, stderr = await run_cli("gc", "--storage", str(tmp_path / "d"), cwd=tmp_path)
    assert code == 2, stderr
    assert "--to" in one_error_line(stderr)


@pytest.mark.parametrize("command", ["ls", "verify"])
async def test_cli_on_an_empty_storage(command: str, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    code, stdout, stderr = await run_cli(
        command, "--storage", str(tmp_path / "d"), "--upstream", "http://127.0.0.1:9",
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, stderr
    assert stderr == ""
    assert ("0 tags" if command == "ls" else "verified 0 files") in stdout


@pytest.mark.parametrize("command", [["ls"], ["verify"], ["gc", "--to", "1"]])
async def test_cli_refuses_a_cache_directory_that_does_not_exist(
    command: list[str], tmp_path: Path
) -> None:
    """A mistyped --storage holds no cache: the command says so instead of creating an
    empty one and reporting success."""
    typo = tmp_path / "typo" / "path"
    code, stdout, stderr = await run_cli(*command, "--storage", str(typo), cwd=tmp_path)
    assert (code, stdout) == (2, ""), stderr
    assert (
        one_error_line(stderr)
        == f"mirror: config: storage.path: no cache directory at {str(typo)!r}"
    )
    assert not (tmp_path / "typo").exists()


async def test_cli_gc_to_a_size(hub: FakeHub, config: Config, tmp_path: Path) -> None:
    add_app(hub)
    await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    code, stdout, stderr = await run_cli(
        "gc", "--storage", str(config.storage.path), "--upstream", hub.registry_url,
        "--to", "1", cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, stderr
    assert "evicted 4 blobs" in stdout
    assert cached_blobs(config) == set()


async def test_cli_warm_reads_a_file_of_images(
    hub: FakeHub, config: Config, tmp_path: Path
) -> None:
    app = add_app(hub, "library/app")
    tool = add_app(hub, "team/tool", layers=2)
    images = tmp_path / "images.txt"
    images.write_text(
        "# images for the rollout\n"
        "\n"
        "library/app:latest   # the app itself\n"
        "   team/tool   \n"
        "# library/missing:latest  (commented out: must not be asked for)\n"
    )
    code, stdout, stderr = await run_cli(
        "warm", "--upstream", hub.registry_url, "--storage", str(config.storage.path),
        "--file", str(images), cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert summary_of(stdout) == (2, 2, 2, 7, 7, 0)
    assert cached_blobs(config) >= set(blob_digests(app) + blob_digests(tool))
    assert not any("missing" in path for _, _, path in hub.stats.requests)


async def test_cli_warm_exits_1_when_an_image_fails(
    hub: FakeHub, config: Config, tmp_path: Path
) -> None:
    add_app(hub)
    code, stdout, stderr = await run_cli(
        "warm", "--upstream", hub.registry_url, "--storage", str(config.storage.path),
        "library/app", "library/missing", cwd=tmp_path,
    )  # fmt: skip
    assert code == 1, stderr
    assert "library/missing:latest: FAILED" in stdout
    assert summary_of(stdout)[:2] == (1, 2)


async def test_cli_verify_exits_1_when_the_bucket_was_not_verified(
    hub: FakeHub, config: Config, tmp_path: Path
) -> None:
    add_app(hub)
    await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    s3 = unreachable_bucket(config).storage.s3
    assert s3 is not None
    settings = {
        "upstream": {"url": hub.registry_url},
        "storage": {"path": str(config.storage.path), "s3": asdict(s3)},
    }
    config_file = tmp_path / "mirror.yaml"
    config_file.write_text(json.dumps(settings))  # JSON is YAML
    code, stdout, stderr = await run_cli("verify", "--config", str(config_file), cwd=tmp_path)
    assert code == 1, stderr
    assert "Traceback" not in stderr
    assert "verified 5 files, removed 0 corrupt\nbucket cache not verified: " in stdout


async def test_cli_ls_after_warm(hub: FakeHub, config: Config, tmp_path: Path) -> None:
    image = add_app(hub)
    await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    config_file = tmp_path / "mirror.yaml"
    settings = {
        "upstream": {"url": hub.registry_url},
        "storage": {"path": str(config.storage.path)},
    }
    config_file.write_text(json.dumps(settings))  # JSON is YAML
    code, stdout, stderr = await run_cli("ls", "--config", str(config_file), cwd=tmp_path)
    assert code == 0, stderr
    assert image["digest"][:19] in stdout
    assert "library/app" in stdout


# --- beside a running serve ---------------------------------------------------------------

# A serve, as far as its cache directory goes: it opens the storage, starts a download's
# temp file, prints its path and runs on until killed.
SERVE_WRITING = """
import asyncio, os, sys
from pathlib import Path
from mirror.storage import Storage

async def main():
    storage = Storage(Path(sys.argv[1]))
    await storage.open()
    fd, temp = storage.new_temp(100)
    os.write(fd, b"the first bytes of a blob")
    print(temp, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.parametrize("beside", ["mirror ls", "a second serve"])
async def test_a_live_serves_temp_file_outlives_a_start_beside_it(
    make_client: MakeClient, config: Config, beside: str
) -> None:
    """A command (or another serve) started on the directory leaves a live download's temp
    file alone: the serve writes on and renames it into place."""
    serve = (await make_client()).app[storage_key]
    data = os.urandom(1024 * 1024)
    digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
    fd, temp = await asyncio.to_thread(serve.new_temp, len(data))
    await asyncio.to_thread(os.write, fd, data[:500_000])

    if beside == "mirror ls":
        await commands.list_cache(config, io.StringIO())
    else:
        other = Storage(config.storage.path)
        await other.open()
        await other.close()

    assert temp.exists()
    await asyncio.to_thread(os.write, fd, data[500_000:])
    await asyncio.to_thread(serve.commit, fd, temp, serve.blob_path(digest))
    assert serve.blob_path(digest).read_bytes() == data


async def test_tags_warmed_beside_a_live_serve_outlive_its_snapshot(
    hub: FakeHub, config: Config, make_client: MakeClient
) -> None:
    """warm and a serve beside it keep in-process metadata in one snapshot file: the
    serve's next save rewrote it from its memory alone, and after a restart with the
    upstream down the warmed tag was a 503."""
    image = add_app(hub)
    add_app(hub, "library/other")
    serve = await make_client()
    await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    resp = await serve.get("/v2/library/other/manifests/latest")  # the serve's own record
    assert resp.status == 200, await resp.text()
    await serve.close()  # its last save

    hub.registry_status = 503
    restarted = await make_client()
    resp = await restarted.get("/v2/library/app/manifests/latest")
    assert resp.status == 200, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == image["digest"]
    assert (await restarted.get("/v2/library/other/manifests/latest")).status == 200


async def test_a_killed_serves_temp_files_go_at_the_next_start_only(config: Config) -> None:
    """What a serve killed mid-download left in tmp/ stays while it runs and through a
    command after its death, and is removed when the next serve starts."""
    root = config.storage.path
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVE_WRITING, str(root),
        env=_python_env(), stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        temp = Path((await asyncio.wait_for(proc.stdout.readline(), CLI_TIMEOUT)).decode().strip())
        assert temp.parent == root / "tmp" and temp.exists()
    finally:
        proc.kill()
        await proc.wait()
    await commands.list_cache(config, io.StringIO())
    assert temp.exists()

    storage = Storage(root)
    await storage.open()
    try:
        assert list(storage.tmp.iterdir()) == []
    finally:
        await storage.close()


@pytest.mark.parametrize("alone", [True, False], ids=["emptied", "swept"])
async def test_a_start_removes_only_the_mirrors_own_files_from_tmp(
    tmp_path: Path, alone: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A storage.path set by mistake (`/`, a home directory) has a tmp/ of others' files:
    a start removes what the mirror names its own leftovers, never anything else."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    ours = ["blob-k3j_x9a2", f"sha256-{'a' * 64}.lock", f"sha256-{'a' * 64}.failed"]
    theirs = ["important.txt", "blob-notes.txt", "sha256-x.lock"]
    for name in ours + theirs:
        (tmp / name).write_text("x")
        os.utime(tmp / name, (0, 0))  # old: the sweep beside other users takes it too
    (tmp / "a-directory").mkdir()
    storage = Storage(tmp_path)
    storage.shared = not alone
    await storage.open()
    try:
        assert sorted(p.name for p in tmp.iterdir()) == sorted([*theirs, "a-directory"])
    finally:
        await storage.close()
    warnings = [r.getMessage() for r in caplog.records if "did not make" in r.getMessage()]
    assert len(warnings) == 1 and "4 entries" in warnings[0], warnings


async def test_cli_refuses_an_empty_storage_path(tmp_path: Path) -> None:
    """`--storage ""` (or an empty MIRROR_STORAGE) is refused as the file's is: it would be
    the working directory."""
    code, _, stderr = await run_cli("ls", "--storage", "", cwd=tmp_path)
    assert code == 2, stderr
    assert "--storage" in one_error_line(stderr)
    assert list(tmp_path.iterdir()) == []


# --- failures as one line -----------------------------------------------------------------


async def test_cli_ls_shows_a_corrupt_manifest_as_unreadable(
    hub: FakeHub, config: Config, tmp_path: Path
) -> None:
    image = add_app(hub)
    await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    path = Storage(config.storage.path).manifest_path(parse_digest(image["digest"]))
    media_type = path.read_bytes().partition(b"\n")[0]
    path.write_bytes(media_type + b"\n{not json")
    code, stdout, stderr = await run_cli(
        "ls", "--storage", str(config.storage.path), "--upstream", hub.registry_url, cwd=tmp_path
    )
    assert (code, stderr) == (0, ""), stderr
    assert re.search(r"library/app\s+latest\s+sha256:\w+\s+unreadable$", stdout, re.M), stdout


async def test_cli_verify_skips_a_file_gone_while_it_runs(
    hub: FakeHub, config: Config, tmp_path: Path
) -> None:
    """A blob evicted between the listing and its hashing is passed over, as other scans
    do: a link to nowhere under a digest's name is listed, then not found."""
    add_app(hub)
    await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    gone = Storage(config.storage.path).blob_path(parse_digest(DIGEST_A))
    gone.parent.mkdir(parents=True, exist_ok=True)
    gone.symlink_to(tmp_path / "evicted")
    code, stdout, stderr = await run_cli(
        "verify", "--storage", str(config.storage.path), "--upstream", hub.registry_url,
        cwd=tmp_path,
    )  # fmt: skip
    assert (code, stderr) == (0, ""), stderr
    assert "verified 5 files, removed 0 corrupt" in stdout


async def test_cli_ls_with_redis_not_answering_says_so_and_fails(tmp_path: Path) -> None:
    """It listed "0 tags" and exited 0, from the in-process stand-in."""
    (tmp_path / "data").mkdir()
    code, stdout, stderr = await run_cli(
        "ls", "--storage", str(tmp_path / "data"), "--redis", f"redis://127.0.0.1:{free_port()}",
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 1, stderr
    assert "mirror: ls: the metadata store does not answer" in stderr
    assert "0 tags" not in stdout


async def test_cli_gc_with_the_bucket_not_answering_says_so_and_fails(tmp_path: Path) -> None:
    """It printed "evicted 0 blobs" and exited 0: a cron job saw the bucket tidied."""
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"storage:\n  path: {tmp_path / 'data'}\n  s3:\n"
        f"    endpoint: http://127.0.0.1:{free_port()}\n    bucket: cache\n"
        "    access_key_id: k\n    secret_access_key: s\n"
    )
    code, stdout, stderr = await run_cli("gc", "--config", str(config), "--to", "1", cwd=tmp_path)
    assert code == 1, stderr
    assert "evicted 0 blobs" in stdout  # the local tier's part, done
    assert "bucket: not evicted: the bucket does not answer" in stdout
    assert "Traceback" not in stderr


@pytest.mark.parametrize("command", [["verify"], ["gc", "--to", "1KB"]])
async def test_cli_on_a_read_only_cache_fails_in_one_line(
    hub: FakeHub, config: Config, tmp_path: Path, command: list[str]
) -> None:
    image = add_app(hub)
    await commands.warm(config, ["library/app:latest"], None, out=io.StringIO())
    flip_byte(Storage(config.storage.path).blob_path(parse_digest(image["config"])), 0)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(read_only(config.storage.path))
        except MountError as exc:
            pytest.skip(f"cannot mount here (needs root with CAP_SYS_ADMIN): {exc}")
        code, _, stderr = await run_cli(
            *command, "--storage", str(config.storage.path), "--upstream", hub.registry_url,
            cwd=tmp_path,
        )  # fmt: skip
    assert code == 1, stderr
    line = one_error_line(stderr)
    assert line.startswith(f"mirror: {command[0]}: Read-only file system: "), line
    assert str(config.storage.path) in line


async def test_cli_warm_with_an_image_list_that_is_not_utf8(tmp_path: Path) -> None:
    images = tmp_path / "images.txt"
    images.write_bytes(b"library/app:v1 # caf\xe9\n")
    code, _, stderr = await run_cli(
        "warm", "--storage", str(tmp_path / "d"), "--upstream", "http://127.0.0.1:9",
        "--file", str(images), cwd=tmp_path,
    )  # fmt: skip
    assert code == 2, stderr
    line = one_error_line(stderr)
    assert "--file" in line and "UTF-8" in line
