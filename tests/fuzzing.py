"""Hostile registry API requests from a seeded generator: the same seed, the same requests.

Names, digests, tags, query values and headers start from real content (so that some
requests reach the cache and the upstream) and are then bent: traversal, %-encodings,
control characters, case, length, odd ranges and validators. Most are well-formed HTTP,
for the mirror to answer; a few break the HTTP grammar, for aiohttp's parser to refuse.
"""

from __future__ import annotations

import base64
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.rawhttp import Request

# Characters a request-target may carry raw (RFC 3986 pchar, plus "/"), and pieces that
# are already %-encoded: the hostile ones reach the handlers decoded.
RAW_SAFE = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@"
HOSTILE = [
    "..", "%2e%2e", "%2E%2E", ".%2e", "%2f", "%2F", "%252f", "%5c", "\\", "//", "./",
    "%00", "%0a", "%0d", "%0d%0a", "%09", "%1b", "%7f", "%ff", "%c3%a9", "%e2%80%ae",
    "%ef%bc%8f", "%20", "+", ";", "@", ":", "~", "!", "$", "&", "'", "(", "*", ",", "=",
    "%", "%g1", "%%", "%3f", "%23", "%25", "{", "}", "|", "^", "`", '"', "<", ">", "[", "]",
    "..;", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/../../../etc/passwd", "/proc/self/environ",
    "%u002e", "\u0085", "é", "ſ", "İ", "\U0001f433",
]  # fmt: skip
# Characters the HTTP grammar refuses raw in a request line, and in a header value.
FORBIDDEN_IN_TARGET = ["\x00", "\x01", "\x08", "\x0b", "\x1b", "\x7f", " ", "é"]
FORBIDDEN_IN_FIELD = ["\x00", "\x01", "\x08", "\x0b", "\x1b", "\x7f"]
TRAVERSALS = [
    "../../../../etc/passwd", "..%2f..%2f..%2fetc%2fpasswd", "%2e%2e/%2e%2e/tmp",
    "blobs/../../..", "..", ".", "...", "tmp/../..", "a/..%00/b",
]  # fmt: skip
METHODS = ["GET"] * 40 + ["HEAD"] * 15 + [
    "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "MKCOL",
    "COPY", "MOVE", "LOCK", "PURGE", "SEARCH", "REPORT", "LINK", "QUERY",
]  # fmt: skip
ACCEPTS = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "*/*", "application/*", "application/json", "text/html", "", ",,,", ";q=1", "*/*;q=0",
    "application/vnd.oci.image.manifest.v1+json;q=abc", "application/x;q=-1;q=2",
    "application/vnd.oci.image.index.v1+json; q=0.0001, */*; q=1e309",
    "a/b;" + "p=1;" * 300, ", ".join(["application/x"] * 400), "\u00e9/\u00e9",
]  # fmt: skip
RANGES = [
    "bytes=0-0", "bytes=0-", "bytes=-1", "bytes=-0", "bytes=5-", "bytes=1-3", "bytes=3-1",
    "bytes=0-1,3-4", "bytes=0-0,-1", "bytes=-", "bytes=", "bytes", "bytes=abc",
    "bytes=99999999999999999999999-", "bytes=0-99999999999999999999999",
    "bytes=-99999999999999999999999", "items=0-1", "BYTES=0-1", "bytes = 0 - 1",
    "bytes=0-1 ", "bytes=1e3-", "bytes=0x10-", "bytes=--1", "bytes=1--2", "bytes=+1-2",
    "bytes=" + ",".join(f"{i}-{i}" for i in range(500)), "bytes=" + "9" * 4000 + "-",
]  # fmt: skip
SCHEMES = ["Basic", "Bearer", "basic", "BEARER", "Digest", "Negotiate", ""]
# aiohttp reads a request line of at most 8190 bytes.
MAX_TARGET = 8100
KNOWN_QUERY = ["ns", "n", "last", "artifactType", "scope", "service", "account"]


@dataclass
class Corpus:
    """Real content the fuzz starts from, and the client credentials it may send."""

    names: list[str]
    tags: list[str]
    digests: list[str]
    passwords: dict[str, str] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)


def flip(rng: random.Random, text: str) -> str:
    """One character replaced, removed or upper-cased, or a hostile piece put in."""
    if not text:
        return rng.choice(HOSTILE)
    at = rng.randrange(len(text))
    kind = rng.randrange(4)
    if kind == 0:
        return text[:at] + text[at].upper() + text[at + 1 :]
    if kind == 1:
        return text[:at] + text[at + 1 :]
    if kind == 2:
        return text[:at] + rng.choice(RAW_SAFE) + text[at + 1 :]
    return text[:at] + rng.choice(HOSTILE) + text[at:]


def encode_target(text: str) -> str:
    """Characters the request line refuses raw, %-encoded; what is already encoded stays."""
    out = []
    for char in text:
        if char in RAW_SAFE or char in "/%?" or char.isascii() and char.isalnum():
            out.append(char)
        else:
            out.append("".join(f"%{byte:02X}" for byte in char.encode()))
    return "".join(out)


class Fuzzer:
    """Requests against the registry API, all from one seed."""

    def __init__(self, seed: int, corpus: Corpus) -> None:
        self.rng = random.Random(seed)
        self.corpus = corpus

    def requests(self, count: int) -> list[Request]:
        return [self.request() for _ in range(count)]

    def request(self) -> Request:
        rng = self.rng
        if rng.random() < 0.04:
            return self.malformed()
        method = rng.choice(METHODS)
        target = encode_target(self.target())
        while len(target) > MAX_TARGET:  # longer is refused by the parser, not the mirror
            target = encode_target(self.target())
        if rng.random() < 0.03:  # absolute-form, as sent to a proxy
            target = "http://" + rng.choice(["mirror.test", "evil.example", "[::1]"]) + target
        body = b""
        headers = self.headers()
        if method not in ("GET", "HEAD") and rng.random() < 0.5 or rng.random() < 0.03:
            body = rng.randbytes(rng.choice([0, 1, 100, 5000]))
            if rng.random() < 0.5:
                headers.append(("Content-Length", str(len(body))))
            else:
                headers.append(("Transfer-Encoding", "chunked"))
                chunk = f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b""
                body = chunk + b"0\r\n\r\n"
        return Request(method, target, tuple(headers), body)

    # --- the request line -------------------------------------------------------------------

    def target(self) -> str:
        rng = self.rng
        pulled, digests = self.corpus.names[:3], self.corpus.digests
        builders: list[Callable[[], str]] = [
            # As a client pulls: names and digests that exist, for Range and validators.
            lambda: f"/v2/{rng.choice(pulled)}/blobs/{rng.choice(digests[1:4])}",
            lambda: f"/v2/{rng.choice(pulled)}/manifests/{rng.choice(['latest', digests[0]])}",
            lambda: f"/v2/{self.name()}/manifests/{self.reference()}",
            lambda: f"/v2/{self.name()}/blobs/{self.digest()}",
            lambda: f"/v2/{self.name()}/tags/list",
            lambda: f"/v2/{self.name()}/referrers/{self.digest()}",
            lambda: f"/v2/{self.name()}/blobs/uploads/{rng.choice(['', 'x', self.digest()])}",
            lambda: rng.choice(["/v2/", "/v2", "/v2//", "/v2/_catalog", "/v2/_catalog/"]),
            lambda: rng.choice(["/", "/healthz", "/readyz", "/metrics", "/token", "/v1/"]),
            lambda: "/" + "/".join(self.junk() for _ in range(rng.randint(1, 6))),
            lambda: "/v2/" + rng.choice(TRAVERSALS) + rng.choice(["", "/manifests/x", "/tags"]),
        ]  # fmt: skip
        weights = [12, 6, 30, 25, 10, 8, 3, 6, 4, 7, 7]
        path = rng.choices(builders, weights)[0]()
        if rng.random() < 0.1:  # an origin-form target starts with "/" (RFC 9112 §3.2)
            path = "/" + flip(rng, path).lstrip("/")
        return path + self.query()

    def name(self) -> str:
        rng = self.rng
        name = rng.choice(self.corpus.names)
        roll = rng.random()
        if roll < 0.6:
            return name
        if roll < 0.8:
            for _ in range(rng.randint(1, 3)):
                name = flip(rng, name)
            return name
        if roll < 0.9:
            return rng.choice(TRAVERSALS) + rng.choice(["", "/" + name])
        length = rng.choice([254, 255, 256, 300, 1000, 4000])
        segment = rng.choice(["a", "ab/", "a-", "a.b/"])
        return (segment * length)[:length].strip("/")

    def tag(self) -> str:
        rng = self.rng
        tag = rng.choice(self.corpus.tags)
        roll = rng.random()
        if roll < 0.5:
            return tag
        if roll < 0.85:
            return flip(rng, tag)
        return rng.choice(["a" * 128, "a" * 129, "_", "-", ".", "", "a" * 3000, "latest:x"])

    def digest(self) -> str:
        rng = self.rng
        digest = rng.choice(self.corpus.digests)
        roll = rng.random()
        if roll < 0.4:
            return digest
        if roll < 0.55:
            return "sha256:" + rng.randbytes(32).hex()  # valid, unknown
        if roll < 0.85:
            return flip(rng, digest)
        algorithm = rng.choice(["sha256", "sha512", "md5", "SHA256", "sha256+b64", "", "..", "x"])
        hexpart = rng.choice(["", "0" * 64, "0" * 128, "0" * 63, "g" * 64, "%2e" * 64, "A" * 64])
        return algorithm + rng.choice([":", "", "::", "%3a"]) + hexpart

    def reference(self) -> str:
        return self.tag() if self.rng.random() < 0.5 else self.digest()

    def junk(self) -> str:
        rng = self.rng
        pieces = [rng.choice(HOSTILE + list(RAW_SAFE)) for _ in range(rng.randint(0, 8))]
        return "".join(pieces)

    def query(self) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            return ""
        pairs = [
            (rng.choice(KNOWN_QUERY + ["x", "", self.junk()]), self.query_value())
            for _ in range(rng.randint(1, 4))
        ]
        text = "&".join(f"{key}={value}" for key, value in pairs)
        return "?" + (flip(rng, text) if rng.random() < 0.1 else text)

    def query_value(self) -> str:
        rng = self.rng
        values: list[Callable[[], str]] = [
            lambda: rng.choice(["docker.io", "ghcr.io", "index.docker.io", "quay.io", ""]),
            lambda: str(rng.choice([-1, 0, 1, 2, 10, 10000, 10001, 2**63, 10**40])),
            lambda: rng.choice(["abc", "1e3", " 1", "0x10", "1.5", "+1", "%201", "%EF%BC%91"]),
            lambda: "9" * rng.choice([12, 13, 4301, 5000]),
            lambda: self.tag(),
            lambda: self.junk(),
            lambda: "repository:" + self.name() + ":" + rng.choice(["pull", "push", "*", ""]),
            lambda: rng.choice(TRAVERSALS),
        ]
        return rng.choice(values)()

    # --- headers ---------------------------------------------------------------------------

    def headers(self) -> list[tuple[str, str]]:
        rng = self.rng
        makers: list[tuple[float, Callable[[], tuple[str, str]]]] = [
            (0.5, lambda: ("Accept", self.accept())),
            (0.25, lambda: ("If-None-Match", self.entity_tags())),
            (0.15, lambda: ("If-Range", self.entity_tags())),
            (0.35, lambda: ("Range", rng.choice(RANGES))),
            (0.4, lambda: ("Authorization", self.authorization())),
            (0.1, lambda: ("X-Request-ID", self.header_text())),
            (0.1, lambda: ("X-Forwarded-Host", self.host())),
            (0.1, lambda: ("X-Forwarded-Proto", rng.choice(["https", "", "gopher", ",", "a b"]))),
            (0.08, lambda: ("Host", self.host())),
            (0.05, lambda: ("X-Fuzz", "v" * rng.choice([1000, 4000, 8000]))),
            (0.05, lambda: (rng.choice(["If-Match", "If-Modified-Since", "Expect"]), "*")),
            (0.05, lambda: ("Accept-Encoding", rng.choice(["gzip", "br", "x" * 2000, ","]))),
        ]
        headers = [make() for chance, make in makers if rng.random() < chance]
        if rng.random() < 0.05:  # the same header again, or many of them
            headers += [("Accept", self.accept()) for _ in range(rng.randint(2, 60))]
        rng.shuffle(headers)
        return headers

    def accept(self) -> str:
        rng = self.rng
        types = rng.sample(ACCEPTS, rng.randint(1, 3))
        return ", ".join(flip(rng, t) if rng.random() < 0.1 else t for t in types)

    def entity_tags(self) -> str:
        rng = self.rng
        digest = self.digest()
        choices = [f'"{digest}"', digest, f'W/"{digest}"', "*", "", '"', "W/", ",", '"a", "b"']
        chosen = rng.sample(choices, rng.randint(1, 3))
        if rng.random() < 0.1:
            chosen.append("Wed, 21 Oct 2015 07:28:00 GMT")
        return ", ".join(chosen)

    def authorization(self) -> str:
        rng = self.rng
        users = list(self.corpus.passwords) or ["nobody"]
        user = rng.choice(users + ["nobody", "", ":", "é"])
        password = self.corpus.passwords.get(user, "x")
        password = rng.choice([password, password + "x", "", "p" * 73, "p" * 200, "\u00e9" * 40])
        credentials = f"{user}:{password}".encode()
        roll = rng.random()
        if roll < 0.4:
            return "Basic " + base64.b64encode(credentials).decode()
        if roll < 0.55 and self.corpus.tokens:
            token = rng.choice(self.corpus.tokens)
            return "Bearer " + (flip(rng, token) if rng.random() < 0.3 else token)
        if roll < 0.7:
            raw = rng.choice([b"nocolon", b"\xff\xfe:\x00", b"a:b:c", credentials * 10])
            return "Basic " + base64.b64encode(raw).decode()
        return rng.choice(SCHEMES) + " " + self.header_text()

    def host(self) -> str:
        rng = self.rng
        return rng.choice(
            ["mirror.test", "", "[", "[::1", "[::1]:5000", "a:b:c", "host:99999", "é.example",
             'x"y', "x,y", "a" * 300, "evil.example/path?q", "user@host", "%00", "localhost:-1"]
        )  # fmt: skip

    def header_text(self) -> str:
        """Printable header text: odd, long, or non-ASCII, but allowed in a field value."""
        rng = self.rng
        pieces = [rng.choice(HOSTILE + list(string.printable[:94])) for _ in range(30)]
        # A field is at most 8190 bytes (aiohttp's limit); a character is at most 4 of them.
        return ("".join(pieces) * rng.choice([1, 1, 10, 100]))[:1900]

    # --- what the HTTP grammar refuses -------------------------------------------------------

    def malformed(self) -> Request:
        rng = self.rng
        kind = rng.randrange(5)
        target = encode_target(f"/v2/{self.name()}/manifests/{self.tag()}")[:MAX_TARGET]
        if kind == 0:
            bad = rng.choice(FORBIDDEN_IN_TARGET)
            return Request("GET", target.replace("/", "/" + bad, 1), malformed=True)
        if kind == 1:
            field = ("X-Bad", "a" + rng.choice(FORBIDDEN_IN_FIELD) + "b")
            return Request("GET", target, (field,), malformed=True)
        if kind == 2:
            return Request(rng.choice(["G\x00T", "FOO", "get", "GET GET"]), "/v2/", malformed=True)
        if kind == 3:
            return Request("GET", "/v2/" + "a" * 9000, malformed=True)
        header = (("Content-Length", "3"), ("Transfer-Encoding", "chunked"))
        return Request("POST", "/v2/", header, b"abc", malformed=True)
