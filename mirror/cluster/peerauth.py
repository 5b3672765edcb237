"""Replica-to-replica requests, signed with the cluster secret.

A request carries `Mirror-Cluster-Auth: <unix time>:<hex HMAC-SHA256(secret, time, method,
path)>`. Signing the time and the path rather than sending the secret means a captured
header is worth one path for a minute, and the secret itself never crosses the network.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from mirror.upstream.body import header_number

HEADER = "Mirror-Cluster-Auth"
MAX_SKEW = 60.0  # seconds a signature stays good, either way (clocks differ a little)


def _mac(secret: bytes, stamp: str, method: str, path: str) -> str:
    message = f"{stamp}\n{method.upper()}\n{path}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, path: str, now: float | None = None) -> str:
    """The header value for a request of `method` on `path` (path and query)."""
    stamp = str(int(time.time() if now is None else now))
    return f"{stamp}:{_mac(secret, stamp, method, path)}"


def verify(
    secret: bytes, value: str | None, method: str, path: str, now: float | None = None
) -> bool:
    """Whether `value` signs this request with `secret`, recently enough."""
    if not value:
        return False
    stamp, _, mac = value.partition(":")
    signed_at = header_number(stamp)  # ASCII digits: str.isdigit() takes "²", int() not
    if signed_at is None or not mac:
        return False
    if abs((time.time() if now is None else now) - signed_at) > MAX_SKEW:
        return False
    # As bytes: compare_digest refuses a str with other than ASCII in it, and aiohttp
    # hands over whatever bytes a header held (undecodable ones as surrogates, which
    # "surrogatepass" encodes whatever they are).
    sent = mac.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(sent, _mac(secret, stamp, method, path).encode())
