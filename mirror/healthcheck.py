"""`python -m mirror.healthcheck`: the container image's HEALTHCHECK.

It asks `/healthz` on the address the running mirror listens on, found as `mirror serve`
finds it: `--listen`, else $MIRROR_LISTEN, else `listen` in the config file (`--config`,
else $MIRROR_CONFIG), else 0.0.0.0:8083; a config with `tls` and no `listen` (or a null
one) serves HTTPS only, so it asks `tls.listen` over HTTPS (without checking the
certificate: it only asks whether the mirror answers). With `tls.client_ca_file` and no
plain listener the probe cannot present a certificate: keep a plain `listen` on 127.0.0.1
for probes then. The flags are read from the command line of the container's first
process (the mirror, started by the image's ENTRYPOINT), so `docker run IMAGE serve
--listen :9000` is checked on 9000 without repeating the port; the variables from the
environment the container gives this probe as it gave the mirror. Exit 0: healthy; 1: not.
"""

from __future__ import annotations

import argparse
import http.client
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import yaml

from mirror.config import ConfigError, parse_listen

DEFAULT_LISTEN = "0.0.0.0:8083"
FIRST_PROCESS = Path("/proc/1/cmdline")
TIMEOUT = 4.0
# A wildcard listen address is reached on loopback of the same family.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def serve_arguments(cmdline: bytes) -> list[str]:
    """The arguments after `serve` in a NUL-separated command line; [] if not `serve`."""
    argv = cmdline.decode(errors="replace").split("\0")
    if "serve" not in argv:
        return []
    return argv[argv.index("serve") + 1 :]


def serve_flags(serve_args: Sequence[str], environ: dict[str, str]) -> argparse.Namespace:
    """`--listen` and `--config` as `mirror serve` takes them: the flag, else its variable."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--listen", default=environ.get("MIRROR_LISTEN"))
    parser.add_argument("--config", default=environ.get("MIRROR_CONFIG"))
    args, _ = parser.parse_known_args(list(serve_args))
    return args


def listen_address(serve_args: Sequence[str], environ: dict[str, str]) -> tuple[str, int]:
    """(host, port) that `mirror serve serve_args` listens on (plain HTTP, or HTTPS when
    `https_only` says so for the same arguments)."""
    args = serve_flags(serve_args, environ)
    if args.listen:
        return parse_listen("--listen", args.listen)
    listen: object = DEFAULT_LISTEN
    if args.config:
        # Only `listen` matters here: the mirror itself validates the rest at start.
        try:
            raw = yaml.safe_load(Path(args.config).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError("--config", f"cannot read {args.config!r}: {exc}") from None
        # A null listen means none (with tls, which https_only answers for), as an absent one.
        if isinstance(raw, dict) and raw.get("listen") is not None:
            listen = raw["listen"]
    return parse_listen("listen", listen)


def https_only(serve_args: Sequence[str], environ: dict[str, str]) -> tuple[str, int] | None:
    """`tls.listen` when the config serves HTTPS and no plain `listen` (absent or null),
    nor `--listen` or $MIRROR_LISTEN, which add a plain listener."""
    args = serve_flags(serve_args, environ)
    if args.listen or not args.config:
        return None
    try:
        raw = yaml.safe_load(Path(args.config).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("tls"), dict):
        return None
    if raw.get("listen") is not None:
        return None
    # Null as absent here too, as the mirror reads tls.listen.
    return parse_listen("tls.listen", raw["tls"].get("listen") or "0.0.0.0:8443")


def health_url(host: str, port: int, scheme: str = "http") -> str:
    host = _LOOPBACK.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/healthz"


def check(url: str, timeout: float = TIMEOUT) -> bool:
    """Whether url answers 200; proxies from the environment are not used for it."""
    # The probe asks whether the mirror answers, not whether its certificate is right.
    unchecked = ssl.create_default_context()
    unchecked.check_hostname = False
    unchecked.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=unchecked)
    )
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status) == 200
    except urllib.error.HTTPError as err:
        err.close()
        return False
    except (OSError, http.client.HTTPException):  # refused, timed out, not HTTP
        return False


def main() -> int:
    try:
        cmdline = FIRST_PROCESS.read_bytes()
    except OSError:
        cmdline = b""
    serve_args, environ = serve_arguments(cmdline), dict(os.environ)
    try:
        tls = https_only(serve_args, environ)
        host, port = tls or listen_address(serve_args, environ)
    except ConfigError as exc:
        print(f"mirror healthcheck: {exc}", file=sys.stderr)
        return 1
    url = health_url(host, port, "https" if tls else "http")
    if check(url):
        return 0
    print(f"mirror healthcheck: {url} did not answer 200", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
