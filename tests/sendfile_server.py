"""A file served by the mirror's send_file on the event loop asked for (tests/test_sendfile.py).

    python -m tests.sendfile_server --loop uvloop --file PATH --port N [--cert C --key K]
                                    [--sndbuf BYTES]

- GET /file: the file, or a single `Range` of it, sized, in slices of SLICE bytes (one
  send_file call each, as the mirror sends a download's file in spans); `?pad=N` adds a
  header of N bytes, a head larger than a small send buffer takes at once;
- GET /copy: the same bytes chunked (no length): send_file's copy path;
- GET /small: a few bytes through aiohttp's writer, for the request after a body.

`--sndbuf` shrinks each connection's send buffer, so that a copied body often leaves
bytes in the transport's buffer when the next response starts. It prints the loop's class
and a line per response cut short, on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import ssl
import sys
from pathlib import Path

from aiohttp import web

from mirror.web.sendfile import send_file
from mirror.web.server import loop_factory

# Odd, so that slices start at unaligned offsets.
SLICE = 3 * 1024 * 1024 + 17
path_key = web.AppKey("path", Path)
sndbuf_key = web.AppKey("sndbuf", int)
log = logging.getLogger("sendfile_server")


def span(request: web.Request, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a `bytes=a-b` or `bytes=a-` range; None: the whole file."""
    raw = request.headers.get("Range", "").removeprefix("bytes=")
    if not raw:
        return None
    first, _, last = raw.partition("-")
    return int(first), (int(last) + 1 if last else size)


async def body(request: web.Request, sized: bool) -> web.StreamResponse:
    path = request.app[path_key]
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if request.app[sndbuf_key] and sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, request.app[sndbuf_key])
    size = path.stat().st_size
    start, end = span(request, size) or (0, size)
    resp = web.StreamResponse(status=206 if "Range" in request.headers else 200)
    if pad := int(request.query.get("pad", 0)):
        resp.headers["X-Pad"] = "p" * pad
    if sized:
        resp.content_length = end - start
    await resp.prepare(request)
    file = await asyncio.to_thread(path.open, "rb")
    sent = [0]

    def counted(length: int) -> None:
        sent[0] += length

    try:
        for offset in range(start, end, SLICE):
            await send_file(request, resp, file, (offset, min(SLICE, end - offset)), counted)
    except ConnectionError as exc:  # as the mirror does: nothing more to send
        log.info("cut short after %d bytes: %s", sent[0], exc)
        return resp
    finally:
        await asyncio.to_thread(file.close)
    await resp.write_eof()
    return resp


async def sized(request: web.Request) -> web.StreamResponse:
    return await body(request, True)


async def chunked(request: web.Request) -> web.StreamResponse:
    return await body(request, False)


async def small(request: web.Request) -> web.Response:
    return web.Response(text="small\n")


async def serve(app: web.Application, port: int, context: ssl.SSLContext | None) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    print(f"loop {type(asyncio.get_running_loop()).__module__}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loop", required=True)
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--sndbuf", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    context = None
    if args.cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
    app = web.Application()
    app[path_key] = args.file
    app[sndbuf_key] = args.sndbuf
    app.router.add_get("/file", sized)
    app.router.add_get("/copy", chunked)
    app.router.add_get("/small", small)
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(serve(app, args.port, context))


if __name__ == "__main__":
    main()
