"""One HTTP/1.1 exchange over a bare socket: the request goes out byte for byte as written.

aiohttp's client normalises paths, checks methods and header values; an attacker's client
does none of that, so the fuzz writes its requests itself and reads the answer to EOF.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from multidict import CIMultiDict


@dataclass(frozen=True)
class Request:
    """A request as it goes on the wire (`Host`, unless given, and `Connection: close` added)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    # Bytes the HTTP grammar refuses: the parser answers before the application sees it.
    malformed: bool = False

    def encode(self) -> bytes:
        head = f"{self.method} {self.target} HTTP/1.1\r\n"
        headers = self.headers
        if not any(name.lower() == "host" for name, _ in headers):
            headers = (("Host", "mirror.test"), *headers)
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
        return (head + lines + "Connection: close\r\n\r\n").encode("utf-8") + self.body

    def __str__(self) -> str:
        shown = [f"{name}: {value[:120]}" for name, value in self.headers]
        return f"{self.method} {self.target[:300]} {shown} body={len(self.body)}B"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""


async def exchange(host: str, port: int, request: Request, timeout: float = 20) -> Answer:
    """Send `request` on a new connection and read the answer until the server closes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request.encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass  # the server may reset a connection whose request it refused
    return parse_answer(raw)


def parse_answer(raw: bytes) -> Answer:
    """The answer in `raw`; status 0 when the server closed without one."""
    if not raw:
        return Answer(0)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        body = dechunk(body)
    return Answer(int(status_line.split(" ")[1]), headers, body)


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)
