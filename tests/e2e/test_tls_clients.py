"""Real clients over TLS: Docker daemons and skopeo pulling through the mirror's HTTPS listener.

    dockerd (certs.d/[::1]:PORT/ca.crt) ─┐
    skopeo --cert-dir ───────────────────┼─https─> mirror ─https (ca_file)─> docker-registry
    containerd (hosts.toml ca, client) ──┘

Docker treats every 127.0.0.0/8 registry as insecure (it skips certificate checks and never
reads certs.d for it), so a Docker test on 127.0.0.1 would prove nothing: the daemons here use
the mirror at https://[::1]:PORT, also loopback, which Docker verifies. One test shows the
127.0.0.1 behaviour. Each daemon gets its own /etc/docker (so its own certs.d) in a private
mount namespace (tests/services.py DockerDaemon.etc_docker). Run with
`python -m pytest tests/e2e/test_tls_clients.py -q -s -m e2e`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certs import CA, Pair, TLSMirror, served_certificate
from tests.images import MIB, Image, busybox_image, large_layer_image, push_image
from tests.services import (
    DOCKER,
    DOCKERD,
    Containerd,
    DistributionRegistry,
    DockerDaemon,
    log_tail,
    wait_for,
)

MISSING = [t for t in (DOCKERD, DOCKER, "docker-registry", "openssl") if not shutil.which(t)]
if os.geteuid() != 0:
    MISSING.append("root")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}"),
]
needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")
LARGE_SIZE = 64 * MIB
WAIT = 60.0


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls-e2e")


@pytest.fixture(scope="module")
def mirror_ca(tls_dir: Path) -> CA:
    return CA(tls_dir / "mirror-ca", "mirror test CA")


@pytest.fixture(scope="module")
def upstream_ca(tls_dir: Path) -> CA:
    return CA(tls_dir / "upstream-ca", "upstream private CA")


@pytest.fixture(scope="module")
def images() -> dict[str, Image]:
    return {"busybox": busybox_image(), "large": large_layer_image(LARGE_SIZE)}


@pytest.fixture(scope="module")
def registry(
    tls_dir: Path, upstream_ca: CA, images: dict[str, Image]
) -> Iterator[DistributionRegistry]:
    """docker-registry over HTTPS with its own private CA (seeded over HTTP first)."""
    reg = DistributionRegistry(tls_dir / "registry")
    with reg:
        for name, image in images.items():
            push_image(reg.url, f"library/{name}", "latest", image)
    pair = upstream_ca.issue("registry")
    reg.tls, reg.tls_ca = (pair.cert, pair.key), upstream_ca.cert
    with reg:
        yield reg


def live_pair(pair: Pair, directory: Path) -> Pair:
    directory.mkdir(parents=True, exist_ok=True)
    live = Pair(directory / "tls.crt", directory / "tls.key")
    rotate(live, pair)
    return live


def rotate(live: Pair, new: Pair) -> None:
    for src, dst in ((new.key, live.key), (new.cert, live.cert)):
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def start_mirror(
    workdir: Path,
    registry: DistributionRegistry,
    mirror_ca: CA,
    upstream_ca: CA,
    tls: dict[str, Any],
    host: str,
) -> TLSMirror:
    config = {"upstream": {"url": registry.url, "ca_file": str(upstream_ca.cert)}}
    return TLSMirror(workdir, registry.url, mirror_ca.cert, tls, config, tls_host=host).start()


@pytest.fixture(scope="module")
def mirror_pairs(tls_dir: Path, mirror_ca: CA) -> tuple[Pair, Pair, Pair]:
    """(the live files, the first pair, the pair rotated in)."""
    first, second = mirror_ca.issue("mirror-first"), mirror_ca.issue("mirror-second")
    return live_pair(first, tls_dir / "mirror-live"), first, second


@pytest.fixture(scope="module")
def mirror(
    tls_dir: Path,
    registry: DistributionRegistry,
    mirror_ca: CA,
    upstream_ca: CA,
    mirror_pairs: tuple[Pair, Pair, Pair],
) -> Iterator[TLSMirror]:
    """HTTPS on [::1] (for Docker) and plain HTTP on 127.0.0.1 (probes)."""
    live = mirror_pairs[0]
    tls = {"cert_file": str(live.cert), "key_file": str(live.key)}
    proc = start_mirror(tls_dir / "mirror", registry, mirror_ca, upstream_ca, tls, "::1")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def mtls_mirror(
    tls_dir: Path, registry: DistributionRegistry, mirror_ca: CA, upstream_ca: CA
) -> Iterator[TLSMirror]:
    """HTTPS on [::1] requiring a client certificate signed by the mirror CA."""
    pair = mirror_ca.issue("mtls-mirror")
    tls = {
        "cert_file": str(pair.cert),
        "key_file": str(pair.key),
        "client_ca_file": str(mirror_ca.cert),
    }
    proc = start_mirror(tls_dir / "mtls-mirror", registry, mirror_ca, upstream_ca, tls, "::1")
    try:
        yield proc
    finally:
        proc.stop()


def docker_with(workdir: Path, mirror_url: str, certs: dict[str, Path] | None) -> DockerDaemon:
    """A daemon whose registry mirror is `mirror_url`; `certs` go in its certs.d for it."""
    daemon = DockerDaemon(workdir, mirror_url)
    if certs is not None:
        etc = workdir / "etc-docker"
        host_dir = etc / "certs.d" / mirror_url.removeprefix("https://")
        host_dir.mkdir(parents=True, exist_ok=True)
        for name, src in certs.items():
            shutil.copyfile(src, host_dir / name)
        daemon.etc_docker = etc
    return daemon


def requests_to(mirror: TLSMirror, path: str) -> list[str]:
    """The mirror's access-log lines for `path` (any method: Docker HEADs tags)."""
    text = mirror.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if f' {path}" ' in line]


def pull(daemon: DockerDaemon, name: str) -> subprocess.CompletedProcess[str]:
    return daemon.docker("pull", name, check=False, timeout=600)


# --- Docker ------------------------------------------------------------------------------


def test_docker_pulls_through_https_mirror_with_ca_in_certs_d(
    tls_dir: Path, mirror: TLSMirror, mirror_ca: CA, images: dict[str, Image]
) -> None:
    with docker_with(tls_dir / "docker-ca", mirror.tls_url, {"ca.crt": mirror_ca.cert}) as d:
        done = pull(d, "busybox")
        assert done.returncode == 0, done.stdout + done.stderr + log_tail(d.log_path)
        assert f"Digest: {images['busybox'].manifest.digest}" in done.stdout
        print(f"\ndocker pull busybox via {mirror.tls_url}:\n{done.stdout}")
    # Docker falls back to Docker Hub when the mirror fails; here it did not need to.
    lines = requests_to(mirror, "/v2/library/busybox/manifests/latest")
    assert any(" ::1 " in line and '" 200 ' in line for line in lines), lines


def test_docker_refuses_the_mirror_with_another_ca_in_certs_d(
    tls_dir: Path, mirror: TLSMirror, upstream_ca: CA
) -> None:
    """The negative control: with the wrong CA in certs.d the pull fails, so the CA counts."""
    with docker_with(tls_dir / "docker-wrong", mirror.tls_url, {"ca.crt": upstream_ca.cert}) as d:
        done = pull(d, "busybox")
        assert done.returncode != 0, done.stdout
        log = d.log_path.read_text(errors="replace")
        assert "x509: certificate signed by unknown authority" in log, log_tail(d.log_path)
        print(f"\ndocker pull with the wrong CA: {done.stderr.strip()}")


def test_docker_does_not_verify_mirrors_on_127_0_0_1(
    tls_dir: Path, mirror_ca: CA, upstream_ca: CA, registry: DistributionRegistry
) -> None:
    """Why the Docker tests use [::1]: 127.0.0.0/8 is always an insecure registry to
    Docker, so with no CA at all the pull still succeeds."""
    pair = mirror_ca.issue("mirror-v4")
    tls = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
    proc = start_mirror(tls_dir / "mirror-v4", registry, mirror_ca, upstream_ca, tls, "127.0.0.1")
    try:
        with docker_with(tls_dir / "docker-v4", proc.tls_url, certs=None) as d:
            done = pull(d, "busybox")
            assert done.returncode == 0, done.stdout + done.stderr
    finally:
        proc.stop()


def test_rotated_certificate_while_a_docker_pull_is_in_flight(
    tls_dir: Path,
    mirror: TLSMirror,
    mirror_ca: CA,
    mirror_pairs: tuple[Pair, Pair, Pair],
    images: dict[str, Image],
) -> None:
    live, first, second = mirror_pairs
    assert served_certificate(mirror.tls_port, mirror_ca.cert, host="::1") == first.der()
    with docker_with(tls_dir / "docker-rotate", mirror.tls_url, {"ca.crt": mirror_ca.cert}) as d:
        d.client_config.mkdir(exist_ok=True)
        env = dict(os.environ, DOCKER_CONFIG=str(d.client_config))
        running = subprocess.Popen(
            [DOCKER, "-H", d.host, "pull", "large"], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            large = images["large"].host_layers[-1].digest
            wait_for(
                "the mirror to start sending the large layer",
                lambda: fetches_in_flight(mirror) > 0 or running.poll() is not None,
                WAIT,
            )
            rotate(live, second)
            wait_for(
                "the rotated certificate on new connections",
                lambda: (
                    served_certificate(mirror.tls_port, mirror_ca.cert, host="::1") == second.der()
                ),
                WAIT,
            )
            in_flight = running.poll() is None
            output, _ = running.communicate(timeout=600)
        finally:
            if running.poll() is None:
                running.kill()
                running.wait()
        assert running.returncode == 0, output
        print(f"\nrotation seen while the pull was still running: {in_flight}\n{output}")
        assert requests_to(mirror, f"/v2/library/large/blobs/{large}"), "not via the mirror"
        # A pull after the rotation, on new connections, verifies the new pair too.
        done = pull(d, "busybox")
        assert done.returncode == 0, done.stdout + done.stderr


def fetches_in_flight(mirror: TLSMirror) -> float:
    """Upstream downloads the mirror has running now (the large layer, during the pull)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{mirror.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("mirror_upstream_fetches_in_flight "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_docker_with_a_client_certificate_through_mtls(
    tls_dir: Path, mtls_mirror: TLSMirror, mirror_ca: CA
) -> None:
    client = mirror_ca.issue("docker-client", client=True)
    certs = {"ca.crt": mirror_ca.cert, "client.cert": client.cert, "client.key": client.key}
    with docker_with(tls_dir / "docker-mtls", mtls_mirror.tls_url, certs) as d:
        done = pull(d, "busybox")
        assert done.returncode == 0, done.stdout + done.stderr + log_tail(d.log_path)
    without = {"ca.crt": mirror_ca.cert}
    with docker_with(tls_dir / "docker-no-client", mtls_mirror.tls_url, without) as d:
        done = pull(d, "busybox")
        assert done.returncode != 0, done.stdout
        refusals = [
            line
            for line in d.log_path.read_text(errors="replace").splitlines()
            if f"{mtls_mirror.tls_url}/v2/" in line and "Error getting v2 registry" in line
        ]
        # asyncio drops the TLS alert when it aborts a failed handshake: the client sees
        # the connection reset, not "certificate required" (a CPython limitation).
        assert refusals, log_tail(d.log_path)
        print(f"\ndocker pull without a client certificate: {done.stderr.strip()}")
        print(f"dockerd log: {refusals[0]}")


# --- skopeo ------------------------------------------------------------------------------


def skopeo(tls_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    home = tls_dir / "skopeo-home"
    (home / "run").mkdir(parents=True, exist_ok=True)
    (home / "registries.conf").write_text("")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(home / "run"),
        "REGISTRY_AUTH_FILE": str(home / "auth.json"),
        "CONTAINERS_REGISTRIES_CONF": str(home / "registries.conf"),
    }
    return subprocess.run(
        ["skopeo", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def cert_dir(directory: Path, files: dict[str, Path]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copyfile(src, directory / name)
    return directory


@pytest.fixture
def v4_mirror(
    tls_dir: Path,
    registry: DistributionRegistry,
    mirror_ca: CA,
    upstream_ca: CA,
    request: pytest.FixtureRequest,
) -> Iterator[TLSMirror]:
    """HTTPS on 127.0.0.1, for skopeo (its reference grammar has no IPv6 literals);
    with mTLS when the test is parametrised so."""
    pair = mirror_ca.issue(f"v4-{request.node.name[-12:]}")
    tls = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
    if getattr(request, "param", False):
        tls["client_ca_file"] = str(mirror_ca.cert)
    workdir = tls_dir / f"v4-{request.node.name}"
    proc = start_mirror(workdir, registry, mirror_ca, upstream_ca, tls, "127.0.0.1")
    try:
        yield proc
    finally:
        proc.stop()


@needs_skopeo
def test_skopeo_inspect_with_cert_dir(
    tls_dir: Path, v4_mirror: TLSMirror, mirror_ca: CA, images: dict[str, Image]
) -> None:
    ref = f"docker://127.0.0.1:{v4_mirror.tls_port}/library/busybox:latest"
    certs = cert_dir(tls_dir / "skopeo-certs", {"ca.crt": mirror_ca.cert})
    done = skopeo(tls_dir, "inspect", "--cert-dir", str(certs), ref)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["Digest"] == images["busybox"].manifest.digest
    refused = skopeo(tls_dir, "inspect", ref)  # the system CAs do not know the mirror's
    assert refused.returncode != 0
    assert "certificate signed by unknown authority" in refused.stderr, refused.stderr


@needs_skopeo
@pytest.mark.parametrize("v4_mirror", [True], indirect=True, ids=["mtls"])
def test_skopeo_mtls_with_and_without_a_client_certificate(
    tls_dir: Path, v4_mirror: TLSMirror, mirror_ca: CA, images: dict[str, Image]
) -> None:
    client = mirror_ca.issue("skopeo-client", client=True)
    ref = f"docker://127.0.0.1:{v4_mirror.tls_port}/library/busybox:latest"
    files = {"ca.crt": mirror_ca.cert, "client.cert": client.cert, "client.key": client.key}
    with_pair = cert_dir(tls_dir / "skopeo-mtls", files)
    done = skopeo(tls_dir, "inspect", "--cert-dir", str(with_pair), ref)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["Digest"] == images["busybox"].manifest.digest
    ca_only = cert_dir(tls_dir / "skopeo-ca-only", {"ca.crt": mirror_ca.cert})
    refused = skopeo(tls_dir, "inspect", "--cert-dir", str(ca_only), ref)
    assert refused.returncode != 0
    print(f"\nskopeo without a client certificate: {refused.stderr.strip()}")


# --- containerd ----------------------------------------------------------------------------


def ctr_hosts_dir(directory: Path, mirror: TLSMirror, files: dict[str, Path]) -> Path:
    """`docker.io/hosts.toml`: pull through the mirror over HTTPS with `ca` (and `client`)."""
    host = directory / "docker.io"
    host.mkdir(parents=True, exist_ok=True)
    lines = [
        'server = "https://registry-1.docker.io"',
        "",
        f"[host.{json.dumps(mirror.tls_url)}]",
        '  capabilities = ["pull", "resolve"]',
        f"  ca = {json.dumps(str(files['ca.crt']))}",
    ]
    if "client.cert" in files:
        pair = [str(files["client.cert"]), str(files["client.key"])]
        lines.append(f"  client = [{json.dumps(pair)}]")
    (host / "hosts.toml").write_text("\n".join(lines) + "\n")
    return directory


@pytest.mark.skipif(shutil.which("containerd") is None, reason="needs containerd")
@pytest.mark.parametrize("v4_mirror", [True], indirect=True, ids=["mtls"])
def test_containerd_pulls_over_mtls_with_ca_and_client_in_hosts_toml(
    tls_dir: Path, v4_mirror: TLSMirror, mirror_ca: CA, images: dict[str, Image]
) -> None:
    client = mirror_ca.issue("containerd-client", client=True)
    full = {"ca.crt": mirror_ca.cert, "client.cert": client.cert, "client.key": client.key}
    with Containerd(tls_dir / "containerd") as ctd:
        ref = "docker.io/library/busybox:latest"
        pull = ["images", "pull", "--snapshotter", "native", "--hosts-dir"]
        no_client = ctr_hosts_dir(tls_dir / "ctr-ca-only", v4_mirror, {"ca.crt": mirror_ca.cert})
        refused = ctd.ctr(*pull, str(no_client), ref, check=False)
        assert refused.returncode != 0, refused.stdout
        done = ctd.ctr(*pull, str(ctr_hosts_dir(tls_dir / "ctr-hosts", v4_mirror, full)), ref)
        listed = ctd.ctr("images", "ls").stdout
        assert images["busybox"].manifest.digest in listed, listed
        print(f"\nctr pull over mTLS:\n{done.stdout[-400:]}\nwithout a client pair: "
              f"{refused.stderr.strip()[-300:]}")  # fmt: skip
