"""Logs cannot be forged and hold no secrets (issue 17, item 7).

The attacks: a request whose path, user agent or request id carries a newline and a fake
log line; X-Forwarded-For/-Host/-Proto from a stranger, to pose as another client or to
send the token realm elsewhere; reading /metrics and the status page from outside. And the
leak: a mirror run at log level debug, pulled from with Basic credentials, bearer tokens,
upstream credentials and an S3 bucket, must not write any of them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import logging
import re
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from mirror.config import AuthConfig, Config
from mirror.config.monitoring import MetricsConfig
from mirror.net.proxies import TrustedProxies
from mirror.observe.logs import (
    _CREDENTIAL,
    _CREDENTIAL_HINTS,
    TEXT_FORMAT,
    JsonFormatter,
    TextFormatter,
    setup_logging,
)
from mirror.web.app import create_app
from mirror.web.monitor import create_monitor_app
from tests.conftest import MakeClient
from tests.fakehub import FakeHub
from tests.rgw import CephRGW
from tests.services import MirrorProcess, http_status
from tests.test_config import free_port, run_cli

Client = TestClient[Any, Any]
USER, PASSWORD = "alice", "alice-Pa55-z8w4n2"
UPSTREAM_USER, UPSTREAM_PASSWORD = "mirror-bot", "upstream-Pa55-q9r3t6"
REPO = "library/busybox"
# A fake line as an attacker would smuggle it into a field of a real one.
FORGED = "2030-01-01 00:00:00,000 ERROR mirror [-] FORGED admin logged in"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def raw_request(port: int, head: bytes) -> bytes:
    """Bytes on a socket, as an attacker sends them: no client library to clean them up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


FORGING_REQUESTS = [
    # A percent-encoded newline in the path: aiohttp decodes it into request.path.
    b"GET /v2/library/busybox%0a" + FORGED.replace(" ", "%20").encode() + b"/manifests/x HTTP/1.1",
    b"GET /v2/library/busybox%0d%1b[2J/manifests/latest HTTP/1.1",
    b"GET /v2/library/busybox/manifests/latest%e2%80%a8" + b"FORGED HTTP/1.1",  # U+2028
]


def forging_heads(port: int) -> list[bytes]:
    tail = f"\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n".encode()
    heads = [line + tail + b"\r\n" for line in FORGING_REQUESTS]
    # Control characters in header values (llhttp may refuse them with a 400: also fine).
    heads.append(
        b"GET /v2/ HTTP/1.1" + tail + b"User-Agent: curl\x1b[1A\x1b[2K" + FORGED.encode() + b"\r\n"
        b"X-Request-ID: abc\x0b" + FORGED.encode() + b"\r\n\r\n"
    )
    return heads


REFUSED_PASSWORD = "hunter2-Pa55-refused"
REFUSED_BASIC = base64.b64encode(f"{USER}:{REFUSED_PASSWORD}".encode()).decode()
REFUSED_BEARER = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.refusedSignature0123"


def refused_credential_heads(port: int) -> list[bytes]:
    """Credentials in a header aiohttp refuses to parse (DEL after the value): its error
    quotes the header whole."""
    return [
        f"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {value}\x7f\r\n"
        "Connection: close\r\n\r\n".encode()
        for value in (f"Basic {REFUSED_BASIC}", f"Bearer {REFUSED_BEARER}")
    ]


# --- the leak: a real `mirror serve` at log level debug ----------------------------------


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"{USER}:{hashed}\n")
    return path


@pytest.fixture(params=["filesystem", "s3"])
def storage_yaml(request: pytest.FixtureRequest) -> tuple[str, list[str]]:
    """The `storage.s3` part of the config (empty without a bucket) and its secrets."""
    if request.param == "filesystem":
        return "", []
    rgw: CephRGW = request.getfixturevalue("rgw")
    bucket: str = request.getfixturevalue("s3_bucket")
    s3 = {
        "endpoint": rgw.endpoint, "bucket": bucket, "region": rgw.region,
        "access_key_id": rgw.access_key, "secret_access_key": rgw.secret_key,
    }  # fmt: skip
    return f"  s3: {json.dumps(s3)}\n", [rgw.secret_key]


async def test_a_debug_log_holds_no_credential_and_no_forged_line(
    tmp_path: Path, hub: FakeHub, htpasswd: Path, storage_yaml: tuple[str, list[str]]
) -> None:
    hub.users = {UPSTREAM_USER: UPSTREAM_PASSWORD}
    image = hub.content.add_image(REPO, "latest", [b"busybox layer " * 1000])
    s3_part, s3_secrets = storage_yaml
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"upstream: {{url: '{hub.registry_url}', username: {UPSTREAM_USER}, "
        f"password: {UPSTREAM_PASSWORD}}}\n"
        f"auth: {{htpasswd: {htpasswd}}}\n"
        f"storage:\n  path: {tmp_path / 'data'}\n{s3_part}"
        "log: {level: debug}\n"
    )
    mirror = MirrorProcess(tmp_path / "run", hub.registry_url, extra_args=["--config", str(config)])
    await asyncio.to_thread(mirror.start)
    try:
        secrets = await _pull_every_way(mirror, image) + s3_secrets
        for head in forging_heads(mirror.port) + refused_credential_heads(mirror.port):
            await asyncio.to_thread(raw_request, mirror.port, head)
        secrets += [REFUSED_PASSWORD, REFUSED_BASIC, REFUSED_BEARER]
        await asyncio.sleep(0.5)  # the access lines of the last requests
    finally:
        await asyncio.to_thread(mirror.stop)
    log = mirror.log_path.read_text(errors="replace")
    assert hub.stats["token_basic"] > 0, "the upstream credentials were never used"
    assert not [secret for secret in secrets if secret in log], "a credential reached the log"
    assert not re.search(r"(?i)AWS4-HMAC-SHA256 Credential|X-Amz-Signature=\w", log)
    lines = [line for line in log.splitlines() if not line.startswith("--- start:")]
    strays = [line for line in lines if not LINE.match(line) and not line.startswith(" ")]
    assert not [line for line in strays if "FORGED" in line], strays
    assert any("FORGED" in line for line in lines), "the forging requests left no line at all"
    # A forged name answered as any bad request: no 500, no traceback of a refused header.
    assert "Unhandled exception" not in log and "header injection" not in log
    # Nor an ERROR for a header aiohttp could not parse: any client can send them at will.
    errors = [line for line in lines if (found := LINE.match(line)) and found[1] == "ERROR"]
    assert not errors, "a client's bad header logged as an error"
    assert "bad request (invalid header field) from 127.0.0.1" in log


# What aiohttp's parser refuses, each with the fixed phrase the answer and the log give.
SECRET = "c2VjcmV0LXBhc3N3b3JkLXNlbnQtdG9vLWxvbmc"
UNPARSABLE = {
    "request line or header field too long": (
        f"GET /v2/ HTTP/1.1\r\nAuthorization: Basic {SECRET}{'A' * 20_000}\r\n\r\n"
    ),
    "invalid Content-Length": f"GET /v2/ HTTP/1.1\r\nContent-Length: {SECRET}\r\n\r\n",
    "invalid method": f"G@T /v2/{SECRET} HTTP/1.1\r\n\r\n",
    "Content-Length with Transfer-Encoding": (
        f"GET /v2/{SECRET} HTTP/1.1\r\nContent-Length: 3\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
}


async def test_a_request_the_parser_refuses_is_an_oci_400_that_quotes_nothing(
    tmp_path: Path, hub: FakeHub
) -> None:
    """aiohttp answers these itself, before any middleware: text quoting the bytes sent,
    and at debug a log line quoting them too (a Basic credential with no header name for
    the redaction to see)."""
    config = tmp_path / "mirror.yaml"
    config.write_text("log: {level: debug}\n")
    mirror = MirrorProcess(tmp_path / "run", hub.registry_url, extra_args=["--config", str(config)])
    await asyncio.to_thread(mirror.start)
    try:
        answers = {
            fault: await asyncio.to_thread(raw_request, mirror.port, head.encode())
            for fault, head in UNPARSABLE.items()
        }
        await asyncio.sleep(0.5)  # the last lines
    finally:
        await asyncio.to_thread(mirror.stop)
    log = mirror.log_path.read_text(errors="replace")
    for fault, raw in answers.items():
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400", raw[:300]
        assert b"\r\nContent-Type: application/json" in head, raw[:300]
        assert json.loads(body) == {"errors": [{"code": "UNSUPPORTED", "message": fault}]}
        assert f"bad request ({fault}) from 127.0.0.1" in log
    assert SECRET not in log and "Traceback" not in log


async def _pull_every_way(mirror: MirrorProcess, image: dict[str, Any]) -> list[str]:
    """Pulls with Basic and with a bearer token; the secrets they carried."""
    creds = basic(USER, PASSWORD)
    manifest = f"{mirror.url}/v2/{REPO}/manifests/latest"
    blob = f"{mirror.url}/v2/{REPO}/blobs/{image['layers'][0]}"
    async with aiohttp.ClientSession() as session:
        async with session.get(manifest, headers=creds) as resp:
            assert resp.status == 200, await resp.text()
        url = f"{mirror.url}/token?service=x&scope=repository:{REPO}:pull"
        async with session.get(url, headers=creds) as resp:
            token = (await resp.json())["token"]
        bearer = {"Authorization": f"Bearer {token}"}
        for url in (manifest, blob):
            async with session.get(url, headers=bearer) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
        async with session.get(manifest, headers=basic(USER, "wrong-Pa55-x1")) as resp:
            assert resp.status == 401
    encoded = creds["Authorization"].split()[1]
    upstream = basic(UPSTREAM_USER, UPSTREAM_PASSWORD)["Authorization"]
    # An unsalted hash of a credential is as good as the credential to a dictionary attack.
    upstream_hash = hashlib.sha256(upstream.encode()).hexdigest()
    return [PASSWORD, encoded, token, token.split(".")[2], UPSTREAM_PASSWORD, upstream_hash]


# --- the formatter: one escape helper for every field ------------------------------------


def _record(message: str, *args: object) -> logging.LogRecord:
    record = logging.LogRecord("aiohttp.access", logging.INFO, __file__, 1, message, args, None)
    record.request_id = "-"
    return record


def test_text_lines_escape_what_clients_send() -> None:
    text = TextFormatter(TEXT_FORMAT).format(
        _record('%s "%s" user=%s', "/v2/a\nb\r\x1b[2J\u2028c", "ua\x00", "al\x85ice")
    )
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert r"/v2/a\nb\r\x1b[2J\u2028c" in text and r"ua\x00" in text and r"al\x85ice" in text
    assert "é" in TextFormatter(TEXT_FORMAT).format(_record("café"))  # printable stays


@pytest.mark.parametrize(
    "message",
    [
        "headers={'Authorization': 'Bearer eyJhbGciOi.SECRET.SECRET'}",
        "Authorization: Basic SECRETSECRET==",
        "authorization=AWS4-HMAC-SHA256 Credential=AKIA/x, Signature=SECRETSECRET",
        "GET https://b.s3.example/k?X-Amz-Credential=a&X-Amz-Signature=SECRETSECRET&x=1",
        "{'X-Amz-Security-Token': 'SECRETSECRET'}",
        "password=SECRETSECRET",
    ],
)
def test_credentials_in_any_message_are_redacted(message: str) -> None:
    for formatter in (TextFormatter(TEXT_FORMAT), JsonFormatter()):
        assert "SECRET" not in formatter.format(_record(message)), type(formatter).__name__
        try:
            raise ValueError(f"refused:\n\n  b{message!r}\n{FORGED}")
        except ValueError:
            record = _record("error handling a request")
            record.exc_info = sys.exc_info()
        line = formatter.format(record)
        assert "SECRET" not in line, type(formatter).__name__
        assert "refused:" in line
        if isinstance(formatter, TextFormatter):  # every line of the traceback indented
            assert all(part.startswith("  ") for part in line.splitlines()[1:]), line


def test_every_credential_name_passes_the_quick_check() -> None:
    """Lines are searched only when they hold a hint: each name the search knows has one,
    in any case, the long s and the Kelvin sign the search's (?i) folds included."""
    found = re.search(r"\\b\(([^)]*)\)", _CREDENTIAL.pattern)
    assert found is not None
    names = found.group(1).split("|")
    assert len(names) == 9
    for name in names:
        for variant in (name, name.upper(), name.replace("s", "\u017f").replace("k", "\u212a")):
            assert any(hint in variant.casefold() for hint in _CREDENTIAL_HINTS), variant
    record = _record("X-AMZ-SIGNATURE=SECRETSECRET")
    assert "SECRET" not in TextFormatter(TEXT_FORMAT).format(record)


def test_http_libraries_stay_quiet_at_debug() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    names = ("botocore", "aiobotocore", "urllib3", "aiohttp.client")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        setup_logging("DEBUG", "text")
        for name in names:
            assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING, name
        assert logging.getLogger("mirror").getEffectiveLevel() == logging.DEBUG
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)


# --- proxy headers: believed from trusted_proxies only -----------------------------------


FORGED_PROXY_HEADERS = {
    "X-Forwarded-For": "6.6.6.6",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "https",
}


async def forwarded_count(client: Client) -> float:
    text = await (await client.get("/metrics")).text()
    found = re.search(r"^mirror_forwarded_headers_ignored_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_a_stranger_cannot_pose_as_another_client_or_move_the_realm(
    aiohttp_client: Any,
    config: Config,
    hub: FakeHub,
    htpasswd: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub.content.add_image(REPO, "latest", [b"layer"])
    app = create_app(Config(**{**config.__dict__, "auth": AuthConfig(htpasswd=htpasswd)}))
    client = await aiohttp_client(app)
    caplog.set_level(logging.INFO)
    path = f"/v2/{REPO}/manifests/latest"
    challenge = await client.get(path, headers=FORGED_PROXY_HEADERS)
    assert challenge.status == 401
    realm = challenge.headers["WWW-Authenticate"]
    assert "evil.example" not in realm and realm.startswith('Bearer realm="http://127.0.0.1:')
    pulled = await client.get(path, headers={**FORGED_PROXY_HEADERS, **basic(USER, PASSWORD)})
    assert pulled.status == 200
    assert await forwarded_count(client) == 2
    clients = {_field(r, "client") for r in caplog.records if r.name == "mirror.audit"}
    assert clients == {"127.0.0.1"}


def _field(record: logging.LogRecord, name: str) -> Any:
    access = getattr(record, "access", None)
    return access.get(name) if isinstance(access, dict) else None


async def test_a_trusted_proxy_names_the_client(
    aiohttp_client: Any, config: Config, hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub.content.add_image(REPO, "latest", [b"layer"])
    trusted = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
    app = create_app(Config(**{**config.__dict__, "trusted_proxies": trusted}))
    client = await aiohttp_client(app)
    caplog.set_level(logging.INFO)
    # The client forged the left-most hop; the proxies appended what they saw.
    forwarded = {"X-Forwarded-For": "1.2.3.4, 203.0.113.9, 10.1.1.1"}
    assert (await client.get(f"/v2/{REPO}/manifests/latest", headers=forwarded)).status == 200
    assert await forwarded_count(client) == 0
    clients = {_field(r, "client") for r in caplog.records if r.name == "mirror.audit"}
    assert clients == {"203.0.113.9"}


async def test_a_proxys_own_x_forwarded_for_line_is_read_after_the_clients(
    aiohttp_client: Any, config: Config, hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy that adds a line of its own (haproxy's `option forwardfor`) after the one
    its client sent: the lines are one list, so the client's line cannot name the client."""
    hub.content.add_image(REPO, "latest", [b"layer"])
    trusted = (ipaddress.ip_network("127.0.0.1/32"),)
    app = create_app(Config(**{**config.__dict__, "trusted_proxies": trusted}))
    client = await aiohttp_client(app)
    caplog.set_level(logging.INFO)
    lines = CIMultiDict([("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "203.0.113.9")])
    assert (await client.get(f"/v2/{REPO}/manifests/latest", headers=lines)).status == 200
    clients = {_field(r, "client") for r in caplog.records if r.name == "mirror.audit"}
    assert clients == {"203.0.113.9"}


def test_the_right_most_untrusted_hop_is_the_client() -> None:
    proxies = TrustedProxies([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1")])
    assert proxies.client("10.0.0.2", "1.1.1.1, 2.2.2.2, 10.0.0.7") == "2.2.2.2"
    assert proxies.client("10.0.0.2", "10.0.0.5") == "10.0.0.5"  # all trusted: the first
    assert proxies.client("10.0.0.2", "1.1.1.1, garbage\n, 10.0.0.7") == "10.0.0.7"
    assert proxies.client("::ffff:10.0.0.2", "1.1.1.1") == "1.1.1.1"  # dual-stack socket
    assert proxies.client("192.0.2.1", "1.1.1.1") == "192.0.2.1"  # a stranger's header
    assert proxies.client("::1", "") == "::1"
    origin = proxies.origin("10.0.0.2", "http", "m:80", {"X-Forwarded-Host": 'x"><script>'})
    assert origin.host == "m:80"  # not a host: ignored, even from a trusted proxy
    assert proxies.origin("10.0.0.2", "http", "m", {"X-Forwarded-Proto": "javascript"}).scheme == (
        "http"
    )


def test_forwarded_proto_and_host_are_the_client_facing_proxys() -> None:
    """Of N trusted proxies, the N-th value from the right: a value the client sent before
    its proxy appended one is never taken."""
    proxies = TrustedProxies([ipaddress.ip_network("10.0.0.0/8")])

    def origin(**headers: str) -> tuple[str, str]:
        sent = {f"X-Forwarded-{name.rstrip('_').title()}": value for name, value in headers.items()}
        found = proxies.origin("10.0.0.2", "http", "m:80", sent)
        return found.scheme, found.host

    spoofed = {"proto": "http, https", "host": "evil.example, lb.example"}
    assert origin(for_="1.1.1.1", **spoofed) == ("https", "lb.example")
    assert origin(**spoofed) == ("https", "lb.example")  # the peer alone is one proxy
    chain = {"proto": "https, http", "host": "edge.example, lb.local"}
    assert origin(for_="1.1.1.1, 10.0.0.7", **chain) == ("https", "edge.example")
    # Fewer values than proxies (the inner one set none): the left-most.
    assert origin(for_="1.1.1.1, 10.0.0.7", proto="https", host="edge.example") == (
        "https",
        "edge.example",
    )


# --- /metrics and the status page: restricted ---------------------------------------------


async def test_metrics_need_a_login_with_require_auth(
    make_client: MakeClient, htpasswd: Path
) -> None:
    client = await make_client(
        auth=AuthConfig(htpasswd=htpasswd, anonymous_pull=True),
        metrics=MetricsConfig(require_auth=True),
    )
    for path in ("/metrics", "/"):
        resp = await client.get(path)
        assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Basic realm="mirror"'
        assert (await client.get(path, headers=basic(USER, "wrong"))).status == 401
        assert (await client.get(path, headers=basic(USER, PASSWORD))).status == 200
    assert (await client.get("/healthz")).status == 200  # probes stay open
    assert (await client.get("/v2/library/x/tags/list")).status != 401  # anonymous pulls too
    metrics = await (await client.get("/metrics", headers=basic(USER, PASSWORD))).text()
    assert 'mirror_client_auth_refused_total{reason="password"} 2.0' in metrics


async def test_metrics_listen_takes_them_off_the_client_listener(
    aiohttp_client: Any, aiohttp_server: Any, config: Config
) -> None:
    app = create_app(
        Config(**{**config.__dict__, "metrics": MetricsConfig(listen=("127.0.0.1", 0))})
    )
    client = await aiohttp_client(app)
    monitor = await aiohttp_server(create_monitor_app(app))
    for path in ("/metrics", "/"):
        assert (await client.get(path)).status == 404
    async with aiohttp.ClientSession() as session:
        async with session.get(monitor.make_url("/metrics")) as resp:
            assert resp.status == 200 and "mirror_http_requests_total" in await resp.text()
        async with session.get(monitor.make_url("/")) as resp:
            assert resp.status == 200 and "<html" in (await resp.text()).lower()
        async with session.get(monitor.make_url("/v2/")) as resp:
            assert resp.status == 404  # the API is not on the monitoring listener


def test_metrics_listen_is_served_by_mirror_serve(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "mirror.yaml"
    config.write_text(f"metrics: {{listen: '127.0.0.1:{port}'}}\n")
    mirror = MirrorProcess(tmp_path, "http://127.0.0.1:9", extra_args=["--config", str(config)])
    with mirror:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert b"mirror_http_requests_total" in resp.read()
        assert http_status(f"{mirror.url}/metrics") == 404
    # The port taken: exit 2 naming the key.
    result = run_cli("serve", "--config", str(config), "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert result.stderr.startswith("mirror: config: metrics.listen: "), result.stderr
