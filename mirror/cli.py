"""The `mirror` command: `mirror serve` runs the mirror."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mirror import __version__, commands
from mirror.allocator import return_large_blocks
from mirror.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_text,
    parse_size,
    read_config_text,
)
from mirror.net import tls
from mirror.observe.logs import setup_logging
from mirror.oci.errors import RegistryError
from mirror.storage.base import NotTidied
from mirror.supervisor import (
    Supervisor,
    private_metrics_dir,
    remove_metrics_dir,
    worker_command,
)
from mirror.web import server
from mirror.web.app import create_app
from mirror.web.keys import metrics_key
from mirror.web.monitor import create_monitor_app
from mirror.web.tlsreload import enable_reload
from mirror.worker import (
    WorkerSeat,
    adopt_sockets,
    config_text_descriptor,
    read_config_descriptor,
    seat_from_environment,
    stop_with_parent,
)

# The setting of the listener that serves /metrics and the status page alone.
METRICS_KEY = "metrics.listen"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = _with_common(commands.add_parser("serve", help="run the mirror"))
    serve.add_argument(
        "--listen",
        default=os.environ.get("MIRROR_LISTEN"),
        help="HOST:PORT to listen on (default: $MIRROR_LISTEN, else the file's, else 0.0.0.0:8083)",
    )
    warm = _with_common(commands.add_parser("warm", help="pull images into the cache"))
    warm.add_argument("images", nargs="*", metavar="IMAGE", help="e.g. nginx:1.27, ghcr.io/o/i")
    warm.add_argument("--file", help="a file of images, one per line (# comments)")
    warm.add_argument("--platform", help="only this platform of an index, e.g. linux/amd64")
    _with_common(commands.add_parser("ls", help="list cached repositories, tags and sizes"))
    gc = _with_common(commands.add_parser("gc", help="evict blobs now"))
    gc.add_argument(
        "--to",
        help="evict the directory and the bucket each down to this size"
        " (default: storage.max_size, storage.s3.max_size)",
    )
    _with_common(commands.add_parser("verify", help="re-hash the cache, remove corrupt files"))
    return parser


def _with_common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config",
        default=os.environ.get("MIRROR_CONFIG"),
        help="YAML config file (default: $MIRROR_CONFIG)",
    )
    # Each flag has an environment twin; a flag beats its variable, which beats the file.
    parser.add_argument(
        "--upstream", default=os.environ.get("MIRROR_UPSTREAM"), help="upstream registry URL"
    )
    parser.add_argument(
        "--storage", default=os.environ.get("MIRROR_STORAGE"), help="cache directory"
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("MIRROR_REDIS"),
        help="Redis URL for metadata (default: in-process)",
    )
    return parser


def load(args: argparse.Namespace, seat: WorkerSeat | None = None) -> tuple[Config, str | None]:
    """The config file's text (a worker's: as its supervisor read it) and its config, with
    the command line's flags laid over it."""
    text = None
    if seat is not None and seat.config is not None:
        text = read_config_descriptor(seat.config)
    elif args.config is not None:
        text = read_config_text(args.config)
    config = Config() if text is None else config_from_text(text, args.config or "--config")
    overridden = apply_overrides(
        config,
        listen=getattr(args, "listen", None),
        upstream=args.upstream,
        storage=args.storage,
        redis=args.redis,
    )
    return overridden, text


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        seat = seat_from_environment(os.environ) if args.command == "serve" else None
        config, text = load(args, seat)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # The one-shot commands print their own report; their logs are for problems only.
    quiet = config.log.level if config.log.level in ("DEBUG", "ERROR") else "WARNING"
    if args.command == "serve":
        setup_logging(config.log.level, config.log.format, seat.index if seat else None)
        return_large_blocks()
        serve(config, sys.argv[1:] if argv is None else argv, seat, text)
        return
    setup_logging(quiet, config.log.format)
    try:
        if args.command != "warm":
            require_cache(config)
        status = asyncio.run(run_command(args, config))
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except RegistryError as exc:  # a bad image reference on the command line
        print(f"mirror: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:  # the cache refused (read-only, its permissions): one line
        print(f"mirror: {args.command}: {describe_os_error(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(status)


def describe_os_error(exc: OSError) -> str:
    """`<reason>: <file>` of a failed file operation."""
    reason = exc.strerror or str(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


async def run_command(args: argparse.Namespace, config: Config) -> int:
    """warm, ls, gc, verify; the exit status."""
    if args.command == "warm":
        images = list(args.images) + (read_image_list(args.file) if args.file else [])
        if not images:
            raise ConfigError("IMAGE", "name at least one image, or --file")
        for image in images:  # every reference checked before anything is fetched
            commands.parse_image(image)
        if args.platform is not None:
            commands.check_platform(args.platform)
        report = await commands.warm(config, images, args.platform)
        return 1 if report.failures else 0
    if args.command == "ls":
        try:
            await commands.list_cache(config)
        except commands.MetadataUnreachable as exc:
            print(f"mirror: ls: {exc}", file=sys.stderr)
            return 1
    elif args.command == "gc":
        to = parse_size("--to", args.to) if args.to else None
        if to is None and not has_bound(config):
            raise ConfigError("--to", "no bound to evict to: pass --to or set storage.max_size")
        try:
            await commands.collect_garbage(config, to)
        except NotTidied:  # said on stdout: the local part was done, the rest not
            return 1
    elif args.command == "verify":
        result = await commands.verify(config)
        return 0 if result.unverified is None else 1  # not all of it verified: not a pass
    return 0


def has_bound(config: Config) -> bool:
    """Does the config bound the directory or the bucket (what `gc` without --to needs)?"""
    storage = config.storage
    bucket_bound = storage.s3 is not None and storage.s3.max_size is not None
    return storage.max_size is not None or storage.max_idle is not None or bucket_bound


def require_cache(config: Config) -> None:
    """ls, gc and verify need a cache: at a mistyped path they would create an empty one and
    report success (warm may fill a new one, and serve creates it). With a bucket, the
    bucket is the cache."""
    if config.storage.s3 is None and not config.storage.path.is_dir():
        raise ConfigError("storage.path", f"no cache directory at {str(config.storage.path)!r}")


def read_image_list(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError("--file", f"cannot read {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("--file", f"{path!r} is not UTF-8 text") from None
    entries = (line.partition("#")[0].strip() for line in lines)
    return [entry for entry in entries if entry]


def metadata_kind(config: Config) -> str:
    """Where tags and records live, as the start-up line names it."""
    if config.redis.url:
        return "redis"
    return "sqlite (shared by the workers)" if config.workers > 1 else "in-process"


def serve(
    config: Config, argv: list[str], seat: WorkerSeat | None = None, text: str | None = None
) -> None:
    """Run the mirror: in this process, as a supervisor of workers, or as one of them
    (`text`: the config file's, for the workers)."""
    listeners, context = make_listeners(config)
    if seat is None and config.workers > 1:
        raise SystemExit(supervise(config, listeners, argv, text))
    inherited = None
    if seat is not None:
        stop_with_parent(seat)
        with one_line_exit():
            inherited = adopt_sockets(seat, len(listeners))

    def announce() -> None:  # only once every address is bound and the app has started
        logging.getLogger(__name__).info(
            "serving on %s, upstream %s, storage %s, metadata %s",
            describe(listeners),
            config.upstream.url,
            config.storage.path,
            metadata_kind(config),
        )

    app = create_app(config)
    listeners = [
        dataclasses.replace(x, app=create_monitor_app(app)) if x.key == METRICS_KEY else x
        for x in listeners
    ]
    if seat is not None:
        app[metrics_key].count_worker_start(seat.restarted)
    if config.tls is not None and context is not None:
        enable_reload(app, context, config.tls, app[metrics_key])
    with one_line_exit():  # a taken port, a failed check at start (S3): no traceback
        server.run(
            app,
            listeners,
            config.shutdown_timeout,
            announce,
            config.server,
            event_loop=config.event_loop,
            inherited=inherited,
            shutdown_delay=config.shutdown_delay,
        )


def make_listeners(config: Config) -> tuple[list[server.Listener], ssl.SSLContext | None]:
    """The plain, TLS and metrics listeners the config asks for; a bad TLS pair exits 2
    here."""
    listeners = [server.Listener(config.host, config.port)] if config.http else []
    context = None
    if config.tls is not None:
        with one_line_exit():  # a bad or mismatched pair stops it here, before anything listens
            context = tls.server_context(config.tls)
        listeners.append(server.Listener(config.tls.host, config.tls.port, context, "tls.listen"))
    if config.metrics.listen is not None:
        # Bound with the others (by the supervisor, with workers); its app is set by serve.
        host, port = config.metrics.listen
        listeners.append(server.Listener(host, port, None, METRICS_KEY))
    return listeners, context


def supervise(
    config: Config, listeners: list[server.Listener], argv: list[str], text: str | None = None
) -> int:
    """Bind every listener here, then run `workers` processes on them, each on the config
    file's `text` as read now; the exit status."""
    with one_line_exit():
        sockets = [server.bind(listener) for listener in listeners]
    config_fd = None if text is None else config_text_descriptor(text)
    metrics = private_metrics_dir(config.storage.path)
    logging.getLogger(__name__).info(
        "%d workers serving on %s", config.workers, describe(listeners)
    )
    try:
        command = worker_command(argv)
        return Supervisor(
            # Each worker drains (shutdown_delay) before its requests get shutdown_timeout.
            command,
            sockets,
            config.workers,
            config.shutdown_delay + config.shutdown_timeout,
            metrics.path,
            config_fd,
        ).run()
    finally:
        remove_metrics_dir(metrics)
        if config_fd is not None:
            os.close(config_fd)


def describe(listeners: list[server.Listener]) -> str:
    return ", ".join(
        f"{'https' if x.ssl_context else 'http'}://{x.host}:{x.port}" for x in listeners
    )


@contextmanager
def one_line_exit() -> Iterator[None]:
    """A ConfigError inside becomes its one line on stderr and exit status 2."""
    try:
        yield
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
