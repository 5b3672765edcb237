"""A closed-loop HTTP/1.1 load generator for what wrk cannot do: HEAD.

wrk waits for the body that a HEAD response's Content-Length announces, so every HEAD ends
in a timeout (wg/wrk#198). This sends one request at a time on each keep-alive connection,
like wrk, and reports the same figures. Being Python it costs more CPU per request than
wrk, so compare its numbers only with its own (the bench runs GET by tag with it too).

    python -m tests.bench.loadgen URL --method HEAD --connections 16 --seconds 10 -H 'Accept: …'

writes {"requests", "seconds", "errors", "latencies_us": [...]} as JSON to --output (not to
stdout: the event loop may leave stdout non-blocking, and a large write then breaks off).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.clients import BenchError, WrkResult


@dataclass
class Tally:
    latencies_us: list[int] = field(default_factory=list)
    errors: int = 0


def build_request(url: str, method: str, headers: list[str]) -> tuple[str, int, bytes]:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [f"{method} {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}", *headers]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode()


def content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


async def connection(
    host: str, port: int, request: bytes, is_head: bool, deadline: float, tally: Tally
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < deadline:
            start = time.perf_counter_ns()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = content_length(head)
            if not is_head:
                if length is None:
                    raise BenchError("a response without Content-Length: not supported")
                await reader.readexactly(length)
            tally.latencies_us.append((time.perf_counter_ns() - start) // 1000)
            tally.errors += not head.startswith((b"HTTP/1.1 2", b"HTTP/1.1 3"))
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> dict[str, object]:
    host, port, request = build_request(args.url, args.method, args.header)
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.seconds
    is_head = args.method == "HEAD"
    await asyncio.gather(
        *(
            connection(host, port, request, is_head, deadline, tally)
            for _ in range(args.connections)
        )
    )
    return {
        "requests": len(tally.latencies_us),
        "seconds": time.monotonic() - start,
        "errors": tally.errors,
        "latencies_us": tally.latencies_us,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("-H", "--header", action="append", default=[])
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    args.output.write_text(json.dumps(result))


# --- the parent side: several processes, merged like wrk's threads --------------------------


def percentile(sorted_values: list[int], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(len(sorted_values) * pct / 100))
    return float(sorted_values[index])


def loadgen(
    url: str, method: str, headers: list[str], seconds: int, processes: int = 2,
    connections: int = 32,
) -> WrkResult:  # fmt: skip
    """`connections` spread over `processes`; the merged result in wrk's terms."""
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        outputs = [Path(tmp) / f"{i}.json" for i in range(processes)]
        each = connections // processes
        commands = [_command(url, method, headers, seconds, each, out) for out in outputs]
        procs = [subprocess.Popen(cmd) for cmd in commands]
        codes = [proc.wait(timeout=seconds + 60) for proc in procs]
        if any(codes):
            raise BenchError(f"loadgen {method} {url} failed: exit statuses {codes}")
        parts = [json.loads(out.read_text()) for out in outputs]
    latencies = sorted(lat for part in parts for lat in part["latencies_us"])
    requests = sum(int(part["requests"]) for part in parts)
    return WrkResult(
        rps=requests / max(float(part["seconds"]) for part in parts),
        p50_ms=percentile(latencies, 50) / 1000,
        p99_ms=percentile(latencies, 99) / 1000,
        requests=requests,
        errors=sum(int(part["errors"]) for part in parts),
    )


def _command(
    url: str, method: str, headers: list[str], seconds: int, connections: int, output: Path
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "tests.bench.loadgen",
        url,
        "--method",
        method,
        "--connections",
        str(connections),
        "--seconds",
        str(seconds),
        "--output",
        str(output),
    ]
    return cmd + [arg for header in headers for arg in ("-H", header)]  # fmt: skip


if __name__ == "__main__":
    main()
