"""Real clients through real mirror processes: two upstreams, two routes, two auth modes.

    containerd (ctr, hosts.toml) ─┐                           ┌─ docker.io: fake hub (Bearer)
    skopeo, path prefix ──────────┼─> mirror (no client auth)─┤     └─> docker-registry
                                  │                           └─ registry.example:
    skopeo, docker login + pull ──┴─> mirror (htpasswd) ──────────  docker-registry (Basic)

The hosts.toml files name the real registries (https://registry-1.docker.io,
https://registry.example) as servers: neither is reachable here, so a pull that succeeds was
served by the mirror. At the end every log file and every client's output is searched for
each secret used (upstream password, client passwords, a token the mirror issued): none may
be there. Run with `python -m pytest tests/e2e/test_clients.py -q -s -m e2e`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.clients_helpers import (
    Ran,
    Transcript,
    basic_token,
    find_secrets,
    write_hosts_dir,
    write_htpasswd,
    write_mirror_config,
    write_secret,
)
from tests.images import Image, busybox_image, busybox_layer, multiarch_index, push_image
from tests.images import single_image as build_single_image
from tests.services import (
    DOCKER,
    DOCKERD,
    Containerd,
    DistributionRegistry,
    DockerDaemon,
    FakeHubProcess,
    MirrorProcess,
    http_status,
)

UPSTREAM_USER = "u"
UPSTREAM_PASSWORD = "upstream-Pa55-e2e-7Rq2"
CLIENT_USER = "u"
CLIENT_PASSWORD = "client-Pa55-e2e-4Kx9"
WRONG_PASSWORD = "wrong-Pa55-e2e-1Zb6"
BASIC_REPO, BASIC_TAG = "team/app", "v1"
REGISTRY_EXAMPLE = "registry.example"


def _missing(*tools: str, root: bool = False) -> list[str]:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if root and os.geteuid() != 0:
        missing.append("root")
    return missing


def needs(*tools: str, root: bool = False) -> pytest.MarkDecorator:
    missing = _missing(*tools, root=root)
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} on this machine")


pytestmark = [pytest.mark.e2e, needs("docker-registry")]
needs_containerd = needs("containerd", "ctr", root=True)
needs_skopeo = needs("skopeo")
needs_docker = needs(DOCKERD, DOCKER, root=True)

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Pushed:
    """An image pushed to one of the upstreams: where, and what a client must get."""

    repo: str
    tag: str
    image: Image

    @property
    def digest(self) -> str:
        return self.image.manifest.digest


# --- upstreams ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clients_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clients")


@pytest.fixture(scope="module")
def transcript(clients_dir: Path) -> Transcript:
    return Transcript(clients_dir / "client-output.log")


@pytest.fixture(scope="module")
def hub_registry(clients_dir: Path) -> Iterator[DistributionRegistry]:
    """The content behind the Bearer upstream: a plain distribution registry."""
    with DistributionRegistry(clients_dir / "hub-registry") as registry:
        yield registry


@pytest.fixture(scope="module")
def hub_images(hub_registry: DistributionRegistry) -> dict[str, Pushed]:
    images = {
        "busybox": Pushed("library/busybox", "latest", busybox_image()),
        "multiarch": Pushed("library/multiarch", "latest", multiarch_index()),
    }
    for pushed in images.values():
        push_image(hub_registry.url, pushed.repo, pushed.tag, pushed.image)
    return images


@pytest.fixture(scope="module")
def hub(
    clients_dir: Path, hub_registry: DistributionRegistry, hub_images: dict[str, Pushed]
) -> Iterator[FakeHubProcess]:
    """docker.io: a Docker-Hub-like front (token service, CDN) with Bearer auth."""
    with FakeHubProcess(hub_registry.url, workdir=clients_dir / "fakehub") as fake:
        yield fake


@pytest.fixture(scope="module")
def basic_app() -> Pushed:
    """A busybox-like image (own title, so its own config; the busybox layer, shared)."""
    return Pushed(BASIC_REPO, BASIC_TAG, build_single_image("basic-app", [busybox_layer()]))


@pytest.fixture(scope="module")
def basic_registry(clients_dir: Path, basic_app: Pushed) -> Iterator[DistributionRegistry]:
    """registry.example: a real distribution registry behind htpasswd (Basic) auth.

    Seeded without auth, then restarted (same port, same storage) with auth on."""
    registry = DistributionRegistry(clients_dir / "basic-registry")
    with registry:
        push_image(registry.url, basic_app.repo, basic_app.tag, basic_app.image)
    registry.htpasswd = write_htpasswd(
        clients_dir / "basic-registry" / "htpasswd", {UPSTREAM_USER: UPSTREAM_PASSWORD}
    )
    with registry:
        assert http_status(f"{registry.url}/v2/") == 401, "the registry does not ask for auth"
        request = urllib.request.Request(
            f"{registry.url}/v2/{basic_app.repo}/manifests/{basic_app.tag}",
            headers={
                "Authorization": f"Basic {basic_token(UPSTREAM_USER, UPSTREAM_PASSWORD)}",
                "Accept": basic_app.image.manifest.media_type,
            },
        )
        with _OPENER.open(request, timeout=10) as resp:
            assert resp.headers["Docker-Content-Digest"] == basic_app.digest
        yield registry


# --- mirrors -----------------------------------------------------------------------------------


def upstreams_config(
    clients_dir: Path, hub: FakeHubProcess, basic_registry: DistributionRegistry
) -> dict[str, object]:
    password_file = write_secret(clients_dir / "secrets" / "registry-example", UPSTREAM_PASSWORD)
    return {
        "upstreams": {
            "docker.io": {"url": hub.registry_url},
            REGISTRY_EXAMPLE: {
                "url": basic_registry.url,
                "username": UPSTREAM_USER,
                "password_file": str(password_file),
            },
        },
        "default_upstream": "docker.io",
        "log": {"level": "info"},
    }


@pytest.fixture(scope="module")
def mirror(
    clients_dir: Path, hub: FakeHubProcess, basic_registry: DistributionRegistry
) -> Iterator[MirrorProcess]:
    """The mirror without client auth: docker.io (default) and registry.example."""
    workdir = clients_dir / "mirror"
    config = write_mirror_config(
        workdir / "mirror.yml", upstreams_config(clients_dir, hub, basic_registry)
    )
    with MirrorProcess(workdir, hub.registry_url, extra_args=["--config", str(config)]) as proc:
        yield proc


@pytest.fixture(scope="module")
def auth_mirror(
    clients_dir: Path, hub: FakeHubProcess, basic_registry: DistributionRegistry
) -> Iterator[MirrorProcess]:
    """The same upstreams behind client auth (htpasswd); public_url unset."""
    workdir = clients_dir / "auth-mirror"
    htpasswd = write_htpasswd(workdir / "htpasswd", {CLIENT_USER: CLIENT_PASSWORD})
    config = {
        **upstreams_config(clients_dir, hub, basic_registry),
        "auth": {"htpasswd": str(htpasswd)},
    }
    path = write_mirror_config(workdir / "mirror.yml", config)
    with MirrorProcess(workdir, hub.registry_url, extra_args=["--config", str(path)]) as proc:
        yield proc


def host_of(proc: MirrorProcess) -> str:
    return f"127.0.0.1:{proc.port}"


# An access-log line's request and status: `"GET /v2/x/manifests/latest" 200` (the query and
# protocol, when a format shows them, are kept with the path and skipped).
LOG_WAIT = 5.0
ACCESS = re.compile(r'"(GET|HEAD) (/[^\s"]*)(?: HTTP/[\d.]+)?" (\d{3})')


def requests_seen(proc: MirrorProcess) -> list[tuple[str, str, str]]:
    """(method, path, status) of every request in the mirror's access log."""
    return ACCESS.findall(proc.log_path.read_text())


def statuses(
    proc: MirrorProcess, path_start: str, method: str = "GET", at_least: int = 1
) -> list[str]:
    """The statuses the mirror answered to requests whose path starts with path_start.

    The access line is written just after the answer is sent, so a client may exit before
    it is in the file: wait up to LOG_WAIT seconds for `at_least` of them."""
    deadline = time.monotonic() + LOG_WAIT
    while True:
        found = [
            status
            for seen_method, path, status in requests_seen(proc)
            if seen_method == method and path.startswith(path_start)
        ]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def upstream_requests(proc: MirrorProcess, upstream: str) -> dict[str, float]:
    """The mirror's own count of requests it sent to an upstream, by kind and status."""
    with _OPENER.open(f"{proc.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    counts: dict[str, float] = {}
    for name, labels, value in re.findall(r"^(\w+)\{([^}]*)\} (\S+)$", text, re.M):
        if name == "mirror_upstream_requests_total" and f'upstream="{upstream}"' in labels:
            kind = re.search(r'kind="([^"]*)"', labels)
            status = re.search(r'status="([^"]*)"', labels)
            key = f"{kind.group(1) if kind else '?'} {status.group(1) if status else '?'}"
            counts[key] = counts.get(key, 0.0) + float(value)
    return counts


# --- containerd: ?ns= routing, no client auth --------------------------------------------------


@pytest.fixture(scope="module")
def containerd(clients_dir: Path) -> Iterator[Containerd]:
    with Containerd(clients_dir / "containerd") as daemon:
        yield daemon


@pytest.fixture(scope="module")
def hosts_dir(clients_dir: Path, mirror: MirrorProcess) -> Path:
    return write_hosts_dir(
        clients_dir / "certs.d",
        f"http://{host_of(mirror)}",
        {"docker.io": "https://registry-1.docker.io", REGISTRY_EXAMPLE: "https://registry.example"},
    )


# A request line in ctr's --http-dump (logged by logrus, sometimes right after a body).
SENT = re.compile(r"(?:GET|HEAD) /v2/[^\s\"]+ HTTP/[\d.]+")


def ctr_pull(
    containerd: Containerd, transcript: Transcript, hosts_dir: Path, ref: str
) -> tuple[str, list[str]]:
    """`ctr images pull --hosts-dir --http-dump`: the digest containerd recorded for ref,
    and the request lines containerd sent (`HEAD /v2/...?ns=docker.io HTTP/1.1`).

    The full dump (bodies too) goes to a file of its own; the transcript gets the request
    lines and ctr's progress."""
    args = [
        "images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native",
        "--http-dump", ref,
    ]  # fmt: skip
    started = time.monotonic()
    done = containerd.ctr(*args, check=False)
    seconds = time.monotonic() - started
    dumps = transcript.path.parent / "ctr-http-dumps"
    dumps.mkdir(exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "-", ref)
    (dumps / f"{name}.log").write_text(done.stdout + done.stderr)
    sent = SENT.findall(done.stdout + done.stderr)
    progress = [line for line in done.stdout.splitlines() if "level=" not in line]
    shown = subprocess.CompletedProcess(
        done.args, done.returncode, "\n".join(progress + sent) + "\n", ""
    )
    ran = transcript.record(f"ctr {' '.join(args)}", shown, seconds)
    assert ran.ok(), f"ctr pull {ref} failed:\n{done.stdout}\n{done.stderr}"[-5000:]
    listed = containerd.ctr("images", "ls").stdout.splitlines()
    for line in listed[1:]:
        fields = line.split()
        if fields and fields[0] == ref:
            return fields[2], sent
    raise AssertionError(f"{ref} not in `ctr images ls`:\n" + "\n".join(listed))


@needs_containerd
@pytest.mark.parametrize("name", ["busybox", "multiarch"])
def test_containerd_pulls_docker_io_through_the_mirror(
    name: str,
    containerd: Containerd,
    transcript: Transcript,
    hosts_dir: Path,
    mirror: MirrorProcess,
    hub: FakeHubProcess,
    hub_images: dict[str, Pushed],
) -> None:
    pushed = hub_images[name]
    digest, sent = ctr_pull(
        containerd, transcript, hosts_dir, f"docker.io/{pushed.repo}:{pushed.tag}"
    )
    assert digest == pushed.digest
    # containerd asked the mirror (the only host that answers) with ?ns=docker.io ...
    wanted = f"HEAD /v2/{pushed.repo}/manifests/{pushed.tag}?ns=docker.io HTTP/1.1"
    assert wanted in sent, "\n".join(sent)
    assert sent and all("ns=docker.io" in line for line in sent), sent
    # ... the mirror answered it ...
    assert "200" in statuses(mirror, f"/v2/{pushed.repo}/manifests/{pushed.tag}", "HEAD")
    # ... after asking the fake hub.
    asked = [path for _, _, path in hub.stats()["requests"]]
    assert any(path.startswith(f"/v2/{pushed.repo}/manifests/") for path in asked), asked


@needs_containerd
def test_containerd_pulls_registry_example_through_the_mirror(
    containerd: Containerd,
    transcript: Transcript,
    hosts_dir: Path,
    mirror: MirrorProcess,
    basic_app: Pushed,
) -> None:
    digest, sent = ctr_pull(
        containerd, transcript, hosts_dir, f"{REGISTRY_EXAMPLE}/{BASIC_REPO}:{BASIC_TAG}"
    )
    assert digest == basic_app.digest
    wanted = f"HEAD /v2/{BASIC_REPO}/manifests/{BASIC_TAG}?ns={REGISTRY_EXAMPLE} HTTP/1.1"
    assert wanted in sent, "\n".join(sent)
    assert sent and all(f"ns={REGISTRY_EXAMPLE}" in line for line in sent), sent
    # Without the ns the mirror would have asked docker.io, which has no team/app: the
    # config is registry.example's own, fetched from there (with Basic auth) by the mirror.
    manifest = basic_app.image.manifest.data
    assert manifest is not None
    config = json.loads(manifest)["config"]["digest"]
    assert statuses(mirror, f"/v2/{BASIC_REPO}/blobs/{config}") == ["200"]
    counts = upstream_requests(mirror, REGISTRY_EXAMPLE)
    assert counts.get("manifest 200", 0) >= 1 and counts.get("blob 200", 0) >= 1, counts


# --- skopeo: path-prefix route; right, wrong and no credentials --------------------------------


@pytest.fixture(scope="module")
def skopeo_env(clients_dir: Path) -> dict[str, str]:
    """No credentials or registries.conf of the host may help (or hinder) skopeo."""
    home = clients_dir / "skopeo-home"
    (home / "run").mkdir(parents=True, exist_ok=True)
    registries = home / "registries.conf"
    registries.write_text("")
    return {
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(home / "run"),
        "REGISTRY_AUTH_FILE": str(home / "auth.json"),
        "CONTAINERS_REGISTRIES_CONF": str(registries),
        "DOCKER_CONFIG": str(home / "docker"),
    }


def skopeo(
    transcript: Transcript, env: dict[str, str], args: list[str], creds: str | None = None
) -> tuple[bool, str]:
    """Run skopeo; `creds` (user:password) goes on the command line, never in the log."""
    cred_args = ["--creds", creds] if creds else []
    masked = ["--creds", f"{creds.partition(':')[0]}:***"] if creds else []
    shown = " ".join(["skopeo", *args[:1], *masked, *args[1:]])
    ran = transcript.run(["skopeo", *args[:1], *cred_args, *args[1:]], shown=shown, env=env)
    return ran.ok(), ran.output


AUTH_ERROR = re.compile(
    r"unauthori[sz]ed|authentication required|invalid username|no basic auth credentials", re.I
)


@needs_skopeo
def test_skopeo_path_prefix_route(
    transcript: Transcript, skopeo_env: dict[str, str], mirror: MirrorProcess, basic_app: Pushed
) -> None:
    ref = f"docker://{host_of(mirror)}/{REGISTRY_EXAMPLE}/{BASIC_REPO}:{BASIC_TAG}"
    ok, output = skopeo(transcript, skopeo_env, ["inspect", "--tls-verify=false", ref])
    assert ok, output
    assert json.loads(output)["Digest"] == basic_app.digest
    path = f"/v2/{REGISTRY_EXAMPLE}/{BASIC_REPO}/manifests/{BASIC_TAG}"
    assert "200" in statuses(mirror, path), requests_seen(mirror)


def busybox_ref(auth_mirror: MirrorProcess) -> str:
    return f"docker://{host_of(auth_mirror)}/library/busybox:latest"


@needs_skopeo
def test_skopeo_inspect_with_right_credentials(
    transcript: Transcript,
    skopeo_env: dict[str, str],
    auth_mirror: MirrorProcess,
    hub_images: dict[str, Pushed],
) -> None:
    ok, output = skopeo(
        transcript,
        skopeo_env,
        ["inspect", "--tls-verify=false", busybox_ref(auth_mirror)],
        f"{CLIENT_USER}:{CLIENT_PASSWORD}",
    )
    assert ok, output
    assert json.loads(output)["Digest"] == hub_images["busybox"].digest
    assert "200" in statuses(auth_mirror, "/token")


@needs_skopeo
@pytest.mark.parametrize("creds", ["wrong", "none"])
def test_skopeo_inspect_without_right_credentials_fails(
    creds: str,
    transcript: Transcript,
    skopeo_env: dict[str, str],
    auth_mirror: MirrorProcess,
) -> None:
    before = len(statuses(auth_mirror, "/token", at_least=0))
    ok, output = skopeo(
        transcript,
        skopeo_env,
        ["inspect", "--tls-verify=false", busybox_ref(auth_mirror)],
        f"{CLIENT_USER}:{WRONG_PASSWORD}" if creds == "wrong" else None,
    )
    assert not ok, output
    assert AUTH_ERROR.search(output), output
    answered = statuses(auth_mirror, "/token", at_least=before + 1)[before:]
    assert answered == ["401"], f"/token answered {answered}"


@needs_skopeo
def test_skopeo_copy_to_dir_with_right_credentials(
    clients_dir: Path,
    transcript: Transcript,
    skopeo_env: dict[str, str],
    auth_mirror: MirrorProcess,
    hub_images: dict[str, Pushed],
) -> None:
    target = clients_dir / "skopeo-copy"
    shutil.rmtree(target, ignore_errors=True)
    args = [
        "copy", "--insecure-policy", "--src-tls-verify=false",
        "--src-creds", f"{CLIENT_USER}:{CLIENT_PASSWORD}",
        busybox_ref(auth_mirror), f"dir:{target}",
    ]  # fmt: skip
    shown = " ".join(arg.replace(CLIENT_PASSWORD, "***") for arg in ["skopeo", *args])
    ran = transcript.run(["skopeo", *args], shown=shown, env=skopeo_env)
    assert ran.ok(), ran.output
    pushed = hub_images["busybox"]
    manifest = (target / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == pushed.digest
    for blob in pushed.image.blobs:
        data = (target / blob.digest.partition(":")[2]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest


# --- docker: login to the mirror as a registry host, then pull ---------------------------------


@pytest.fixture(scope="module")
def docker(clients_dir: Path, auth_mirror: MirrorProcess) -> Iterator[DockerDaemon]:
    """A private dockerd with no registry mirror: it talks to the mirror as a registry."""
    with DockerDaemon(clients_dir / "docker", None) as daemon:
        yield daemon


@needs_docker
def test_docker_login_then_pull(
    docker: DockerDaemon,
    transcript: Transcript,
    auth_mirror: MirrorProcess,
    hub: FakeHubProcess,
    hub_images: dict[str, Pushed],
) -> None:
    host = host_of(auth_mirror)
    image = f"{host}/library/busybox:latest"

    def run(shown: str, *args: str, stdin: str | None = None) -> Ran:
        started = time.monotonic()
        done = docker.docker(*args, check=False, input=stdin)
        return transcript.record(shown, done, time.monotonic() - started)

    refused = run(f"docker pull {image}  (not logged in)", "pull", image)
    assert not refused.ok() and AUTH_ERROR.search(refused.output), refused.output
    login = ["login", host, "--username", CLIENT_USER, "--password-stdin"]
    shown = f"docker {' '.join(login)}"
    wrong = run(f"{shown}  (wrong password)", *login, stdin=WRONG_PASSWORD + "\n")
    assert not wrong.ok() and AUTH_ERROR.search(wrong.output), wrong.output
    right = run(shown, *login, stdin=CLIENT_PASSWORD + "\n")
    assert right.ok() and "Login Succeeded" in right.output, right.output
    pulled = run(f"docker pull {image}", "pull", image)
    assert pulled.ok(), pulled.output
    assert f"Digest: {hub_images['busybox'].digest}" in pulled.output
    # Docker sent its login to the mirror's realm; the mirror never passed it upstream.
    stats = hub.stats()
    assert stats["token_basic"] == 0 and stats["token_users"] == [], stats["token_users"]


# --- at the end: no secret anywhere ------------------------------------------------------------


def issue_token(auth_mirror: MirrorProcess) -> str:
    """A token from the mirror's /token (as a client gets one), used once for a pull."""
    url = f"{auth_mirror.url}/token?service={host_of(auth_mirror)}"
    request = urllib.request.Request(
        url + "&scope=repository:library/busybox:pull",
        headers={"Authorization": f"Basic {basic_token(CLIENT_USER, CLIENT_PASSWORD)}"},
    )
    with _OPENER.open(request, timeout=10) as resp:
        token = str(json.load(resp)["token"])
    manifest = urllib.request.Request(
        f"{auth_mirror.url}/v2/library/busybox/manifests/latest",
        headers={"Authorization": f"Bearer {token}"},
    )
    with _OPENER.open(manifest, timeout=10) as resp:
        assert resp.status == 200
    try:  # and once where it is not good: the refusal must not echo it either
        _OPENER.open(
            urllib.request.Request(
                f"{auth_mirror.url}/v2/library/multiarch/manifests/latest",
                headers={"Authorization": f"Bearer {token}"},
            ),
            timeout=10,
        ).close()
        raise AssertionError("a token for library/busybox opened library/multiarch")
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        err.close()
        assert err.code == 401 and token not in body
    return token


def test_no_secret_in_logs_or_client_output(
    clients_dir: Path,
    transcript: Transcript,
    mirror: MirrorProcess,
    auth_mirror: MirrorProcess,
) -> None:
    token = issue_token(auth_mirror)
    secrets = {
        "upstream password": UPSTREAM_PASSWORD,
        "upstream Basic credentials": basic_token(UPSTREAM_USER, UPSTREAM_PASSWORD),
        "client password": CLIENT_PASSWORD,
        "client Basic credentials": basic_token(CLIENT_USER, CLIENT_PASSWORD),
        "wrong client password": WRONG_PASSWORD,
        "wrong Basic credentials": basic_token(CLIENT_USER, WRONG_PASSWORD),
        "token issued by /token": token,
        "token signature": token.rpartition(".")[2],
    }
    mirror_logs = [mirror.log_path, auth_mirror.log_path]
    for path in mirror_logs:
        assert path.stat().st_size > 0, f"{path} is empty: the grep would prove nothing"
    assert "/token" in auth_mirror.log_path.read_text()
    # The other services' logs: fake hub, registries, containerd, dockerd.
    others = sorted(path for path in clients_dir.glob("*/*.log") if path not in mirror_logs)
    files = [*mirror_logs, transcript.path, *others]
    found = find_secrets(files, secrets)
    print(f"\nsearched for {len(secrets)} secrets and JWTs in: " + ", ".join(map(str, files)))
    assert not found, f"secrets found: {found}"
