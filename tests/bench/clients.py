"""The load generators, driven as subprocesses: curl for big GETs, wrk for request rates."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CURL_FORMAT = "%{http_code} %{size_download} %{time_total}"
WRK_MARK = "BENCH-JSON "
# Every manifest type a current client accepts, as Docker sends them.
MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
)
ACCEPT = ", ".join(MANIFEST_TYPES)
# All on loopback: an http_proxy in the environment must not be used.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(RuntimeError):
    """A measurement could not be taken (a wrong status, a short body, a tool that failed)."""


@dataclass(frozen=True)
class Fetch:
    """One curl transfer."""

    status: int
    size: int
    seconds: float

    def check(self, url: str, size: int) -> Fetch:
        if self.status != 200 or self.size != size:
            raise BenchError(f"GET {url}: HTTP {self.status}, {self.size} of {size} bytes")
        return self


def curl_command(url: str, headers: tuple[str, ...] = (), follow: bool = False) -> list[str]:
    cmd = ["curl", "-s", "--noproxy", "*", "-o", "/dev/null", "-w", CURL_FORMAT]
    for header in headers:
        cmd += ["-H", header]
    # -L drops a custom Authorization header when the redirect leaves the host:port.
    return cmd + (["-L"] if follow else []) + [url]


def _parse_fetch(output: str) -> Fetch:
    status, size, seconds = output.split()
    return Fetch(int(status), int(size), float(seconds))


def curl_get(url: str, size: int, headers: tuple[str, ...] = (), follow: bool = False) -> Fetch:
    """GET url into /dev/null; curl's own time_total."""
    done = subprocess.run(
        curl_command(url, headers, follow), capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise BenchError(f"curl {url}: exit {done.returncode} {done.stderr.strip()}")
    return _parse_fetch(done.stdout).check(url, size)


def curl_together(url: str, size: int, clients: int) -> tuple[float, list[Fetch]]:
    """`clients` curl processes started at once on url: wall time until the last one ends."""
    start = time.monotonic()
    procs = [
        subprocess.Popen(curl_command(url), stdout=subprocess.PIPE, text=True)
        for _ in range(clients)
    ]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    wall = time.monotonic() - start
    return wall, [_parse_fetch(out).check(url, size) for out in outputs]


def hub_token(token_url: str, repo: str) -> str:
    """An anonymous pull token from the fake hub's token service."""
    query = urllib.parse.urlencode(
        {"service": "registry.docker.io", "scope": f"repository:{repo}:pull"}
    )
    with OPENER.open(f"{token_url}/token?{query}", timeout=10) as resp:
        token: str = json.load(resp)["token"]
    return token


# --- wrk ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles, and every kind of failed request."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # connect, read, write and timeout errors plus non-2xx/3xx answers

    @classmethod
    def parse(cls, output: str) -> WrkResult:
        lines = [line for line in output.splitlines() if line.startswith(WRK_MARK)]
        if not lines:
            raise BenchError(f"wrk printed no result:\n{output[-2000:]}")
        raw = json.loads(lines[-1].removeprefix(WRK_MARK))
        return cls(
            rps=raw["requests"] / (raw["duration_us"] / 1e6),
            p50_ms=raw["p50_us"] / 1000,
            p99_ms=raw["p99_us"] / 1000,
            requests=raw["requests"],
            errors=sum(raw["errors"].values()),
        )


WRK_SCRIPT = """\
wrk.method = "{method}"
wrk.headers["Accept"] = "{accept}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{mark}{{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"errors": {{"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def wrk_script(directory: Path, method: str) -> Path:
    """A wrk Lua script sending `method` with the manifest Accept header."""
    path = directory / f"manifest-{method.lower()}.lua"
    path.write_text(WRK_SCRIPT.format(method=method, accept=ACCEPT, mark=WRK_MARK))
    return path


def wrk(url: str, script: Path, seconds: int, threads: int = 2, connections: int = 32) -> WrkResult:
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
        "-s", str(script), url,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"wrk {url}: exit {done.returncode}\n{done.stderr}{done.stdout}")
    return WrkResult.parse(done.stdout)
