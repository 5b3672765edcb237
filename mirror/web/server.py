"""Running the app: a plain-HTTP site, an HTTPS site, or both at once (a migration).

`web.run_app` takes one SSL context for all of its sites, so `serve` runs its own
`AppRunner` with a site per listener, and stops it gracefully on SIGTERM or SIGINT, on
the event loop `event_loop` names (loop_factory): /readyz answers 503 at once, requests
are still served for `shutdown_delay` (a load balancer's probes see the 503 and send new
requests elsewhere; a second signal cuts the wait short), then the listeners close.
Every site's connections pass through one `ConnectionGuard` (mirror/web/connections.py),
their handlers telling it when they sit idle (mirror/web/keepalive.py); on an HTTPS site
the guard does the TLS handshakes, so that it counts connections from their accept.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from mirror.config import ConfigError, ServerConfig
from mirror.web.accesslog import AccessLogger
from mirror.web.connections import ConnectionGuard
from mirror.web.keepalive import idle_reporting
from mirror.web.keys import drain_key, metrics_key

log = logging.getLogger(__name__)

# File descriptors kept for everything but client connections: cache files, upstream and
# Redis connections, the listeners.
SPARE_FDS = 1024

# A stop signal this soon after the first (seconds) is the same stop delivered twice.
SAME_STOP = 1.0

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    key: str = "listen"  # the setting that moves it, named when its address is taken
    app: web.Application | None = None  # another app than the mirror's (metrics.listen)


def run(
    app: web.Application,
    listeners: list[Listener],
    shutdown_timeout: float,
    on_bound: Callable[[], None] = lambda: None,
    limits: ServerConfig | None = None,
    event_loop: str = "auto",
    inherited: list[socket.socket] | None = None,
    shutdown_delay: float = 0.0,
) -> None:
    """Serve `app` on every listener until SIGTERM or SIGINT, then shut down gracefully.

    Every address is bound before the app starts, so a taken port fails at once as a
    ConfigError naming the setting, and `on_bound` (the "serving on" line) runs only after.
    A worker of `workers: N` passes the sockets its supervisor bound, one per listener.
    """
    limits = limits or ServerConfig()
    factory = loop_factory(event_loop)
    sockets = inherited or [bind(listener) for listener in listeners]
    raise_fd_limit(limits.max_connections + SPARE_FDS)
    bound = list(zip(listeners, sockets, strict=True))
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_serve(app, bound, (shutdown_delay, shutdown_timeout), on_bound, limits))
    finally:
        for sock in sockets:
            sock.close()


def loop_factory(choice: str) -> LoopFactory | None:
    """The `event_loop` setting's loop: None is asyncio's own.

    uvloop (libuv, transports in C) answers small requests for less CPU than asyncio's
    selector loop. Cached blobs and peer transfers go out by sendfile on either loop
    (mirror/net/sendfile.py), so `auto`, the default, takes uvloop wherever it is
    installed, and `asyncio` turns it off.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop  # optional: see pyproject.toml's marker
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("event_loop", "uvloop is not installed (auto: asyncio)") from None
        return None
    return uvloop.new_event_loop


def bind(listener: Listener) -> socket.socket:
    """A listening socket on the listener's address, or a ConfigError naming its key."""
    try:
        infos = socket.getaddrinfo(
            listener.host or None, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(listener.key, f"cannot listen on {_where(listener)}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        cause = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(
            listener.key,
            f"cannot listen on {_where(listener)}: {cause}; set {listener.key} to a free address",
        ) from None
    sock.setblocking(False)
    return sock


def _where(listener: Listener) -> str:
    return (
        f"[{listener.host}]:{listener.port}"
        if ":" in listener.host
        else f"{listener.host}:{listener.port}"
    )


async def _serve(
    app: web.Application,
    bound: list[tuple[Listener, socket.socket]],
    shutdown: tuple[float, float],
    on_bound: Callable[[], None],
    limits: ServerConfig,
) -> None:
    """`shutdown`: the drain before the listeners close, then the wait for requests."""
    delay, shutdown_timeout = shutdown
    # The access logger is the app's own (create_app): it writes the audit line too.
    runner = web.AppRunner(
        app,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=limits.keepalive_timeout,
    )
    await runner.setup()
    guard = ConnectionGuard(
        limits.max_connections,
        limits.header_timeout,
        app[metrics_key].guard,
        send_timeout=limits.send_timeout,
    )
    # Other apps start after the mirror's, whose state they read, and stop before it.
    others = {id(x.app): x.app for x, _ in bound if x.app is not None and x.app is not app}
    runners = {id(app): runner}
    try:
        for key, other in others.items():
            runners[key] = web.AppRunner(other, access_log_class=AccessLogger)
            await runners[key].setup()
        for listener, sock in bound:
            site_runner = runners[id(listener.app or app)]
            site = GuardedSite(site_runner, sock, guard, ssl_context=listener.ssl_context)
            await site.start()
        on_bound()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await _drain(app, stop, delay)
    finally:
        for key in reversed(runners):
            # Stops accepting, lets requests in flight finish (up to shutdown_timeout),
            # then runs the cleanup contexts.
            await runners[key].cleanup()


async def _drain(app: web.Application, stop: asyncio.Event, delay: float) -> None:
    """Answer /readyz 503 and keep serving for `delay`, or until a later signal: one within
    SAME_STOP of the first is that stop delivered twice (a worker gets the supervisor's
    SIGTERM and the process group's; `timeout` and init shims send two), not a hurry."""
    app[drain_key].begin()
    if delay <= 0:
        return
    log.info("stopping: /readyz answers 503; serving %gs more before closing", delay)
    loop = asyncio.get_running_loop()
    began = loop.time()
    end = began + delay
    while (left := end - loop.time()) > 0:
        stop.clear()
        try:
            await asyncio.wait_for(stop.wait(), left)
        except TimeoutError:
            return
        if loop.time() - began >= SAME_STOP:
            log.info("stopping now: a second signal")
            return


class GuardedSite(web.SockSite):
    """A listening socket whose connections `guard` limits."""

    def __init__(
        self,
        runner: web.AppRunner,
        sock: socket.socket,
        guard: ConnectionGuard,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context, backlog=1024)
        self._guard = guard

    async def start(self) -> None:
        # SockSite.start would serve the runner's bare protocol factory: register the
        # site as BaseSite does, then serve the guarded one, whose handlers say when they
        # sit idle in keep-alive.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        # No ssl= here: the loop would hand the guard a connection only once its handshake
        # was done, so connections in theirs would be neither counted nor closable. The
        # guard gives each connection to the loop's TLS protocol itself, once counted: the
        # same protocol, below the same handler.
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.wrap(idle_reporting(server), self._ssl_context),
            sock=self._sock,
            backlog=self._backlog,
        )


def raise_fd_limit(wanted: int) -> None:
    """Raise the soft open-file limit towards `wanted` (never above the hard limit), so
    that the connection cap, not EMFILE, is what turns clients away."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "open-file limit %d is below server.max_connections + %d: raise it (LimitNOFILE)",
            soft,
            SPARE_FDS,
        )
