"""A raw kept-alive HTTP/1.1 connection to a mirror, for tests that must control what the
client does at the socket: its receive window, when it reads, when it stops reading.
(aiohttp's client reuses pooled connections whose window Linux has grown, here up to
tcp_rmem's 32 MiB: a "slow reader" on one of those may have had the whole body sent.)"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# A guard against a hang, not a measure: every wait here ends long before when it passes.
HANG = 60


class Client:
    """One kept-alive HTTP/1.1 connection to the mirror."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, where: Endpoint, rcvbuf: int | None = None) -> Client:
        """Connected; `rcvbuf` fixes the receive window (Linux grows it otherwise)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", where.port))
        if where.context is None:
            return cls(*await asyncio.open_connection(sock=sock))
        tls = await asyncio.open_connection(
            sock=sock, ssl=where.context, server_hostname="localhost"
        )
        return cls(*tls)

    async def ask(self, path: str, fields: str = "") -> tuple[int, dict[str, str]]:
        """Send a GET; the answer's status and headers (names lowercased), body unread."""
        self.send(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n{fields}\r\n".encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), HANG)
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        named = (line.split(":", 1) for line in lines)
        return int(status_line.split()[1]), {k.lower(): v.strip() for k, v in named}

    async def get(self, path: str, fields: str = "") -> tuple[int, bytes]:
        """Send a GET; the answer's status and whole body."""
        status, headers = await self.ask(path, fields)
        return status, await self.body(headers)

    async def body(self, headers: dict[str, str]) -> bytes:
        length = int(headers["content-length"])
        return await asyncio.wait_for(self.reader.readexactly(length), HANG)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def closed(self) -> bool:
        """Waits for the mirror to close the connection, reading whatever comes first: True
        once it is closed, having sent nothing more."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), HANG)
        except ConnectionResetError:
            return True
        return rest == b""

    async def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics, asked on this connection (a new one would take a place)."""
        status, body = await self.get("/metrics")
        assert status == 200
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        raise AssertionError(f"no {name}{labels}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass(frozen=True)
class Endpoint:
    """Where the clients connect: a port, HTTPS when a context is given."""

    port: int
    context: ssl.SSLContext | None = None
