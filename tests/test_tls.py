"""TLS with real processes: the mirror's HTTPS listener (start checks, rotation, mTLS) and the
mirror reaching a real docker-registry served over TLS with its own private CA.

    python ssl / http.client ──https──> mirror ──https (ca_file, client pair)──> docker-registry

Certificates are made by the test with `openssl` (tests/certs.py).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.config import ConfigError, apply_overrides, config_from_mapping
from tests.certs import CA, Pair, TLSMirror, client_context, served_certificate
from tests.e2e.clients_helpers import write_htpasswd
from tests.images import DOCKER_LAYER, Blob, busybox_image, push_blob, push_image
from tests.procmem import open_fds, rss_bytes
from tests.services import (
    REPO_ROOT,
    DistributionRegistry,
    MirrorProcess,
    log_tail,
    tcp_open,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("docker-registry") is None,
    reason="needs openssl and docker-registry",
)

BIG_SIZE = 16 * 1024 * 1024


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def mirror_ca(tls_dir: Path) -> CA:
    return CA(tls_dir / "mirror-ca", "mirror test CA")


@pytest.fixture(scope="module")
def upstream_ca(tls_dir: Path) -> CA:
    return CA(tls_dir / "upstream-ca", "upstream private CA")


@pytest.fixture(scope="module")
def big_blob() -> Blob:
    return Blob.of(DOCKER_LAYER, os.urandom(BIG_SIZE))


@pytest.fixture(scope="module")
def registry(tls_dir: Path, upstream_ca: CA, big_blob: Blob) -> Iterator[DistributionRegistry]:
    """docker-registry over HTTPS with a certificate from its own private CA.

    Seeded over plain HTTP, then restarted (same port, same storage) with TLS on."""
    reg = DistributionRegistry(tls_dir / "registry")
    with reg:
        push_image(reg.url, "library/busybox", "latest", busybox_image())
        push_blob(reg.url, "library/big", big_blob)
    pair = upstream_ca.issue("registry")
    reg.tls, reg.tls_ca = (pair.cert, pair.key), upstream_ca.cert
    with reg:
        assert reg.url.startswith("https://")
        yield reg


def copy_pair(pair: Pair, directory: Path) -> Pair:
    """The pair at fixed paths the mirror's config names (rotated by replacing the files)."""
    directory.mkdir(parents=True, exist_ok=True)
    live = Pair(directory / "tls.crt", directory / "tls.key")
    replace_pair(live, pair)
    return live


def replace_pair(live: Pair, new: Pair) -> None:
    """Rotate as a writer does: each file replaced by rename, the key first."""
    for src, dst in ((new.key, live.key), (new.cert, live.cert)):
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def upstream_entry(registry: DistributionRegistry, **tls: Any) -> dict[str, Any]:
    return {"upstream": {"url": registry.url, **tls}}


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=30) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return int(err.code), err.read()


def mirror_log(mirror: MirrorProcess) -> str:
    text = mirror.log_path.read_text(errors="replace")
    return text.rsplit("--- start:", 1)[-1]


def serve_exit(tmp: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`mirror serve` with `config`, which must stop before it listens."""
    path = tmp / "mirror.yml"
    path.write_text(json.dumps({"storage": {"path": str(tmp / "data")}, **config}))
    return subprocess.run(
        [sys.executable, "-m", "mirror", "serve", "--config", str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


# --- configuration -----------------------------------------------------------------------


def test_tls_section_and_which_listeners_run() -> None:
    """With tls set, plain HTTP runs only where `listen` is given: both during a migration."""
    tls = {"cert_file": "/c.pem", "key_file": "/k.pem", "listen": "127.0.0.1:9443"}
    only_https = config_from_mapping({"tls": tls})
    assert only_https.tls is not None and not only_https.http
    assert (only_https.tls.host, only_https.tls.port) == ("127.0.0.1", 9443)
    both = config_from_mapping({"tls": tls, "listen": "127.0.0.1:8083"})
    assert both.http and both.tls is not None and (both.host, both.port) == ("127.0.0.1", 8083)
    assert config_from_mapping({}).http and config_from_mapping({}).tls is None
    assert not config_from_mapping({"tls": tls, "listen": None}).http
    flagged = apply_overrides(only_https, listen="127.0.0.1:8083")  # --listen: plain HTTP too
    assert flagged.http and flagged.tls == only_https.tls
    default_port = config_from_mapping({"tls": {"cert_file": "/c", "key_file": "/k"}})
    assert default_port.tls is not None and default_port.tls.port == 8443
    for raw, key in (
        ({"tls": {"cert_file": "/c"}}, "tls.key_file"),
        ({"tls": {"cert_file": "/c", "key_file": "/k", "ciphers": "x"}}, "tls.ciphers"),
        ({"listen": None}, "listen"),
        ({"upstream": {"tls_verify": "no"}}, "upstream.tls_verify"),
        ({"upstream": {"client_cert_file": "/c"}}, "upstream.client_key_file"),
        ({"upstreams": {"r.example": {"ca_file": "/nonexistent"}}}, "upstreams.r.example.ca_file"),
    ):
        with pytest.raises(ConfigError) as err:
            config_from_mapping(raw)
        assert err.value.key == key


def test_bad_pairs_at_start_exit_2_naming_the_key(tmp_path: Path, mirror_ca: CA) -> None:
    one, other = mirror_ca.issue("start-one"), mirror_ca.issue("start-other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    client_one = mirror_ca.issue("start-client", client=True)
    cases = [
        ({"cert_file": str(one.cert), "key_file": str(other.key)}, "tls.key_file", "not match"),
        ({"cert_file": str(garbage), "key_file": str(one.key)}, "tls.cert_file", "no PEM"),
        ({"cert_file": str(one.cert), "key_file": str(garbage)}, "tls.key_file", "not a usable"),
        ({"cert_file": str(tmp_path / "gone.crt"), "key_file": str(one.key)}, "tls.cert_file",
         "cannot read"),
    ]  # fmt: skip
    for tls, key, words in cases:
        done = serve_exit(tmp_path, {"tls": tls})
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"mirror: config: {key}: ") and words in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    upstream = {"client_cert_file": str(client_one.cert), "client_key_file": str(other.key)}
    done = serve_exit(tmp_path, {"upstream": upstream})
    assert done.returncode == 2
    assert done.stderr.startswith("mirror: config: upstream.client_key_file: "), done.stderr


# --- the HTTPS listener ------------------------------------------------------------------


def test_rotated_pair_serves_new_connections_while_a_transfer_in_flight_finishes(
    tls_dir: Path, mirror_ca: CA, upstream_ca: CA, registry: DistributionRegistry, big_blob: Blob
) -> None:
    first, second = mirror_ca.issue("rotate-first"), mirror_ca.issue("rotate-second")
    live = copy_pair(first, tls_dir / "rotate-live")
    tls = {"cert_file": str(live.cert), "key_file": str(live.key)}
    config = upstream_entry(registry, ca_file=str(upstream_ca.cert))
    with TLSMirror(tls_dir / "rotate", registry.url, mirror_ca.cert, tls, config) as mirror:
        assert served_certificate(mirror.tls_port, mirror_ca.cert) == first.der()
        # A blob transfer starts on the first pair and is left half-read.
        conn = http.client.HTTPSConnection(
            "127.0.0.1", mirror.tls_port, context=client_context(mirror_ca.cert), timeout=60
        )
        conn.request("GET", f"/v2/library/big/blobs/{big_blob.digest}")
        resp = conn.getresponse()
        assert resp.status == 200
        head = resp.read(1024 * 1024)
        assert conn.sock is not None
        assert conn.sock.getpeercert(binary_form=True) == first.der()

        replace_pair(live, second)
        wait_for(
            "the rotated certificate on a new connection",
            lambda: served_certificate(mirror.tls_port, mirror_ca.cert) == second.der(),
        )
        status, _ = get(f"{mirror.tls_url}/v2/", client_context(mirror_ca.cert))
        assert status == 200

        # The transfer in flight carries on to the end, on the first pair.
        body = head + resp.read()
        assert hashlib.sha256(body).hexdigest() == big_blob.digest.removeprefix("sha256:")
        assert conn.sock.getpeercert(binary_form=True) == first.der()
        conn.close()
        assert "tls: loaded a new certificate" in mirror_log(mirror)


def test_bad_pair_at_reload_keeps_serving_the_old_one(
    tls_dir: Path, mirror_ca: CA, registry: DistributionRegistry
) -> None:
    good, other = mirror_ca.issue("reload-good"), mirror_ca.issue("reload-other")
    live = copy_pair(good, tls_dir / "reload-live")
    tls = {"cert_file": str(live.cert), "key_file": str(live.key)}
    with TLSMirror(tls_dir / "reload", registry.url, mirror_ca.cert, tls) as mirror:
        # The other certificate with the good key: a mismatched pair.
        shutil.copyfile(other.cert, live.cert)
        wait_for("the refusal in the log", lambda: "is refused" in mirror_log(mirror))
        line = next(x for x in mirror_log(mirror).splitlines() if "is refused" in x)
        assert "ERROR" in line and "tls.key_file" in line and "does not match" in line
        for _ in range(3):  # new connections still get the good pair
            assert served_certificate(mirror.tls_port, mirror_ca.cert) == good.der()
        assert get(f"{mirror.tls_url}/v2/", client_context(mirror_ca.cert))[0] == 200
        # Garbage in place of the key: refused as well, still serving.
        live.key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        wait_for("a second refusal", lambda: mirror_log(mirror).count("is refused") >= 2)
        assert served_certificate(mirror.tls_port, mirror_ca.cert) == good.der()
        # A good pair again: loaded.
        replace_pair(live, other)
        wait_for(
            "the good pair after the bad ones",
            lambda: served_certificate(mirror.tls_port, mirror_ca.cert) == other.der(),
        )
        metrics = get(f"{mirror.url}/metrics")[1].decode()
        assert reloads(metrics, "refused") >= 2 and reloads(metrics, "loaded") >= 1, metrics


def reloads(metrics: str, result: str) -> float:
    prefix = f'mirror_tls_reloads_total{{result="{result}"}} '
    (line,) = [x for x in metrics.splitlines() if x.startswith(prefix)]
    return float(line.removeprefix(prefix))


def test_mtls_refuses_a_client_without_a_certificate(
    tls_dir: Path, mirror_ca: CA, upstream_ca: CA, registry: DistributionRegistry
) -> None:
    server = mirror_ca.issue("mtls-server")
    client = mirror_ca.issue("mtls-client", client=True)
    stranger = upstream_ca.issue("mtls-stranger", client=True)  # another CA signed it
    tls = {
        "cert_file": str(server.cert),
        "key_file": str(server.key),
        "client_ca_file": str(mirror_ca.cert),
    }
    with TLSMirror(tls_dir / "mtls", registry.url, mirror_ca.cert, tls) as mirror:
        url = f"{mirror.tls_url}/v2/"
        assert get(url, client_context(mirror_ca.cert, client)) == (200, b"{}")
        for who in (None, stranger):
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                get(url, client_context(mirror_ca.cert, who))
        # Without a certificate, TLS 1.3 finishes the client's side of the handshake; the
        # server then drops the connection before any HTTP answer.
        context = client_context(mirror_ca.cert)
        with socket.create_connection(("127.0.0.1", mirror.tls_port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                try:
                    sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
                    answer = sock.recv(100)
                except (ssl.SSLError, ConnectionError):
                    answer = b""
                assert answer == b""


def test_tls_1_1_is_refused(tls_dir: Path, mirror_ca: CA, registry: DistributionRegistry) -> None:
    pair = mirror_ca.issue("old-tls")
    tls = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
    with TLSMirror(tls_dir / "old-tls", registry.url, mirror_ca.cert, tls) as mirror:
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{mirror.tls_port}", "-tls1_1"],
            input="", capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode != 0, done.stdout
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{mirror.tls_port}", "-tls1_2",
             "-CAfile", str(mirror_ca.cert), "-verify_return_error"],
            input="", capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0 and "Verify return code: 0 (ok)" in done.stdout


# --- the mirror as a TLS client of its upstream --------------------------------------------


def manifest_via(mirror: MirrorProcess) -> tuple[int, bytes]:
    return get(f"{mirror.url}/v2/library/busybox/manifests/latest")


def test_upstream_with_private_ca_through_ca_file(
    tls_dir: Path, upstream_ca: CA, registry: DistributionRegistry
) -> None:
    config = tls_dir / "ca-file.yml"
    config.write_text(json.dumps(upstream_entry(registry, ca_file=str(upstream_ca.cert))))
    with MirrorProcess(
        tls_dir / "ca-file", registry.url, extra_args=["--config", str(config)]
    ) as mirror:
        status, body = manifest_via(mirror)
        assert status == 200, body
        assert json.loads(body)["schemaVersion"] == 2


def test_upstream_without_ca_file_fails_naming_the_upstream(
    tls_dir: Path, registry: DistributionRegistry
) -> None:
    name = registry.url.removeprefix("https://")
    with MirrorProcess(tls_dir / "no-ca-file", registry.url) as mirror:
        status, body = manifest_via(mirror)
        assert status == 503
        error = json.loads(body)["errors"][0]
        assert error["code"] == "UNAVAILABLE"
        message = error["message"]
        assert message.startswith(f"upstream {name}: its TLS certificate was refused (")
        assert "unable to get local issuer certificate" in message and "ca_file" in message
        log = mirror_log(mirror)
        assert "ERROR mirror.upstream [" in log and message in log, log_tail(mirror.log_path)


def test_upstream_tls_verify_false_is_warned_about(
    tls_dir: Path, registry: DistributionRegistry
) -> None:
    config = tls_dir / "no-verify.yml"
    config.write_text(json.dumps(upstream_entry(registry, tls_verify=False)))
    with MirrorProcess(
        tls_dir / "no-verify", registry.url, extra_args=["--config", str(config)]
    ) as mirror:
        assert manifest_via(mirror)[0] == 200
        name = registry.url.removeprefix("https://")
        warning = f"WARNING mirror.tls [-] upstream {name}: tls_verify is false"
        assert warning in mirror_log(mirror)


def test_upstream_requiring_a_client_certificate(tls_dir: Path, upstream_ca: CA) -> None:
    """docker-registry with `clientcas`: the mirror's client pair gets in, none does not."""
    reg = DistributionRegistry(tls_dir / "mtls-registry")
    with reg:
        push_image(reg.url, "library/busybox", "latest", busybox_image())
    server = upstream_ca.issue("mtls-registry")
    client = upstream_ca.issue("mirror-as-client", client=True)
    reg.tls, reg.tls_ca = (server.cert, server.key), upstream_ca.cert
    reg.tls_client_ca = upstream_ca.cert
    with reg:
        name = reg.url.removeprefix("https://")
        with_pair = tls_dir / "with-pair.yml"
        with_pair.write_text(
            json.dumps(
                upstream_entry(
                    reg,
                    ca_file=str(upstream_ca.cert),
                    client_cert_file=str(client.cert),
                    client_key_file=str(client.key),
                )
            )
        )
        without = tls_dir / "without-pair.yml"
        without.write_text(json.dumps(upstream_entry(reg, ca_file=str(upstream_ca.cert))))
        with MirrorProcess(
            tls_dir / "with-pair", reg.url, extra_args=["--config", str(with_pair)]
        ) as mirror:
            assert manifest_via(mirror)[0] == 200
        with MirrorProcess(
            tls_dir / "without-pair", reg.url, extra_args=["--config", str(without)]
        ) as mirror:
            status, body = manifest_via(mirror)
            assert status == 503
            message = json.loads(body)["errors"][0]["message"]
            assert message.startswith(f"upstream {name}: "), message
            assert "TLS failed" in message and "client_cert_file" in message, message


# --- the Kubernetes overlay ----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize)")
def test_kubernetes_tls_overlay_mounts_the_secret_where_the_config_reads_it() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(REPO_ROOT / "deploy" / "kubernetes-tls")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered) if d}
    pod = docs[("StatefulSet", "mirror")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = config_from_mapping(
        yaml.safe_load(docs[("ConfigMap", "mirror-config")]["data"]["config.yaml"])
    )
    assert config.tls is not None and config.http
    assert ports == {"http": config.port, "https": config.tls.port}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "subPath" not in mounts["tls"]  # a subPath mount never sees a renewed Secret
    for path in (config.tls.cert_file, config.tls.key_file):
        assert str(path.parent) == mounts["tls"]["mountPath"]
    assert volumes["tls"]["secret"]["secretName"] == "mirror-tls"
    service_ports = {p["name"]: p for p in docs[("Service", "mirror")]["spec"]["ports"]}
    assert service_ports["https"]["targetPort"] == "https"
    base = yaml.safe_load((REPO_ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    assert replace(config, tls=None) == config_from_mapping(
        yaml.safe_load(base["data"]["config.yaml"])
    ), "deploy/kubernetes-tls/configmap-tls.yaml is out of step with the base config"


def test_blobs_over_https_from_a_download_and_from_the_cache_with_range(
    tls_dir: Path, mirror_ca: CA, upstream_ca: CA, registry: DistributionRegistry, big_blob: Blob
) -> None:
    """Both send paths over TLS (they copy in large chunks, not asyncio's TLS sendfile)."""
    pair = mirror_ca.issue("blobs-https")
    tls = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
    config = upstream_entry(registry, ca_file=str(upstream_ca.cert))
    with TLSMirror(tls_dir / "blobs-https", registry.url, mirror_ca.cert, tls, config) as mirror:
        url = f"{mirror.tls_url}/v2/library/big/blobs/{big_blob.digest}"
        context = client_context(mirror_ca.cert)
        for _ in range(2):  # from the download under way, then from the cache
            status, body = get(url, context)
            assert status == 200 and hashlib.sha256(body).hexdigest() in big_blob.digest
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        start = BIG_SIZE - 3 * 1024 * 1024 - 7
        request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"})
        with opener.open(request, timeout=30) as resp:
            assert resp.status == 206
            assert big_blob.data is not None and resp.read() == big_blob.data[start:]


STALLED_CLIENTS = 100
MIB = 1024 * 1024


def stalled_tls_get(port: int, context: ssl.SSLContext, path: str) -> ssl.SSLSocket:
    """A TLS connection that asks for `path` and never reads: its tiny receive window
    fills at once, and the server's bytes wait in its own buffers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    tls = context.wrap_socket(sock, server_hostname="127.0.0.1")
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return tls


def test_tls_clients_that_stop_reading_hold_little_memory_and_give_it_back(
    tls_dir: Path, mirror_ca: CA, upstream_ca: CA, registry: DistributionRegistry, big_blob: Blob
) -> None:
    """Rounds of 100 TLS clients asking for the cached big blob and never reading, then
    closing. The copied body held 3.5 MB of the mirror's memory per such client, and once
    they left it stayed in reference cycles: each round added about 150 MB (until a full
    garbage collection, which a server making few objects seldom runs)."""
    pair = mirror_ca.issue("stalled")
    tls = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
    config = upstream_entry(registry, ca_file=str(upstream_ca.cert))
    with TLSMirror(tls_dir / "stalled", registry.url, mirror_ca.cert, tls, config) as mirror:
        path = f"/v2/library/big/blobs/{big_blob.digest}"
        context = client_context(mirror_ca.cert)
        assert get(mirror.tls_url + path, context)[0] == 200  # cached now
        fds, start = open_fds(mirror.pid), rss_bytes(mirror.pid)
        held, after = [], []
        for _ in range(6):
            clients = [
                stalled_tls_get(mirror.tls_port, context, path) for _ in range(STALLED_CLIENTS)
            ]
            time.sleep(2)  # the mirror writes what the buffers take, then waits
            held.append(rss_bytes(mirror.pid) - start)
            for client in clients:
                client.close()
            wait_for("every connection closed", lambda: open_fds(mirror.pid) <= fds)
            after.append(rss_bytes(mirror.pid) - start)
    rounds = (
        f"MiB over the start, held: {[n // MIB for n in held]}, after: {[n // MIB for n in after]}"
    )
    # Under 1 MiB a client while they wait (the piece in hand, what waits in the TLS and
    # socket transports' buffers); freed as they leave, and kept by the allocator for the
    # next rounds to reuse once the first has grown its heaps.
    assert max(held) < STALLED_CLIENTS * 2 * MIB, rounds
    assert after[-1] - after[1] < 30 * MIB, rounds


def test_a_kubernetes_secret_update_is_picked_up(
    tls_dir: Path, mirror_ca: CA, registry: DistributionRegistry
) -> None:
    """A Secret volume: tls.crt -> ..data/tls.crt, and an update swaps the ..data symlink
    to a new timestamped directory in one rename (the files' own paths never change)."""
    old, new = mirror_ca.issue("k8s-old"), mirror_ca.issue("k8s-new")
    volume = tls_dir / "k8s-secret"

    def publish(pair: Pair, version: str) -> None:
        stamped = volume / f"..{version}"
        stamped.mkdir(parents=True)
        shutil.copyfile(pair.cert, stamped / "tls.crt")
        shutil.copyfile(pair.key, stamped / "tls.key")
        (volume / "..data_tmp").symlink_to(stamped.name)
        os.replace(volume / "..data_tmp", volume / "..data")

    publish(old, "2026_01_01_00_00_00.1")
    for name in ("tls.crt", "tls.key"):
        (volume / name).symlink_to(f"..data/{name}")
    tls = {"cert_file": str(volume / "tls.crt"), "key_file": str(volume / "tls.key")}
    with TLSMirror(tls_dir / "k8s", registry.url, mirror_ca.cert, tls) as mirror:
        assert served_certificate(mirror.tls_port, mirror_ca.cert) == old.der()
        publish(new, "2026_02_01_00_00_00.2")
        wait_for(
            "the certificate from the updated Secret",
            lambda: served_certificate(mirror.tls_port, mirror_ca.cert) == new.der(),
        )
        assert "is refused" not in mirror_log(mirror)


def test_client_auth_challenge_over_https_names_an_https_realm(
    tls_dir: Path, mirror_ca: CA, registry: DistributionRegistry
) -> None:
    """With auth.htpasswd, a client that came over HTTPS is sent to /token over HTTPS."""
    pair = mirror_ca.issue("auth-https")
    htpasswd = write_htpasswd(tls_dir / "auth-https" / "htpasswd", {"u": "client-Pa55-tls"})
    tls = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
    config = {"auth": {"htpasswd": str(htpasswd)}}
    with TLSMirror(tls_dir / "auth-https", registry.url, mirror_ca.cert, tls, config) as mirror:
        context = client_context(mirror_ca.cert)
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open(f"{mirror.tls_url}/v2/", timeout=30)
        with err.value:
            assert err.value.code == 401
            challenge = err.value.headers["WWW-Authenticate"]
        assert challenge.startswith(f'Bearer realm="{mirror.tls_url}/token"'), challenge
        basic = "Basic " + base64.b64encode(b"u:client-Pa55-tls").decode()
        request = urllib.request.Request(
            f"{mirror.tls_url}/token?service=x&scope=repository:library/busybox:pull",
            headers={"Authorization": basic},
        )
        with opener.open(request, timeout=30) as resp:
            assert json.load(resp)["token"]


def test_upstream_certificate_for_another_name_is_named_as_such(
    tls_dir: Path, upstream_ca: CA
) -> None:
    """Signed by the trusted CA but for another host: the error says so (no ca_file hint)."""
    reg = DistributionRegistry(tls_dir / "wrong-name-registry")
    pair = upstream_ca.issue("wrong-name", names=("DNS:registry.example",))
    reg.tls, reg.tls_ca = (pair.cert, pair.key), upstream_ca.cert
    reg.is_ready = lambda: tcp_open(reg.port)  # type: ignore[method-assign]
    with reg:
        config = tls_dir / "wrong-name.yml"
        config.write_text(json.dumps(upstream_entry(reg, ca_file=str(upstream_ca.cert))))
        with MirrorProcess(
            tls_dir / "wrong-name", reg.url, extra_args=["--config", str(config)]
        ) as mirror:
            status, body = manifest_via(mirror)
        assert status == 503
        message = json.loads(body)["errors"][0]["message"]
        name = reg.url.removeprefix("https://")
        assert message.startswith(f"upstream {name}: its TLS certificate was refused (")
        assert "127.0.0.1" in message and "ca_file" not in message, message
