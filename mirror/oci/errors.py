"""Registry errors, each one an OCI error code and HTTP status.

    RegistryError
    ├── NameInvalid, NameUnknown, TagInvalid, DigestInvalid     (bad or unknown references)
    ├── PaginationNumberInvalid                                  (a bad `n` in a list's query)
    ├── ManifestUnknown, ManifestInvalid, BlobUnknown            (content)
    ├── RangeNotSatisfiable                                      (416)
    ├── Unsupported, ExpectationFailed                           (push/delete, odd Expect)
    ├── RequestMalformed                                         (HTTP the parser refused)
    ├── Unauthorized, Denied                                     (the mirror's own auth)
    │   └── UpstreamUnauthorized, UpstreamDenied                 (the upstream's answer)
    ├── TooManyLogins, LoginsBusy                                (logins refused for now)
    ├── TooManyRequests                                          (the upstream's limit)
    ├── BlobTooLarge                                             (over storage.max_blob_size)
    └── UpstreamUnavailable                                      (upstream down, 5xx, timeout)
        ├── DigestMismatch                                       (bytes not their digest)
        └── UpstreamMisdirected                                  (sent where it may not)

The error middleware (`web/app.py`, through `web/errors.py`) turns any of them into
`{"errors": [{"code": ..., "message": ..., "detail": ...}]}`. Messages must never carry
credentials or tokens: they are written for the client to read.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class RegistryError(Exception):
    """An error a registry client understands: an OCI code, an HTTP status, a message."""

    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500
    # True for what an upstream did (its refusal, its limit, its outage): logged as such.
    from_upstream: ClassVar[bool] = False

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> bytes:
        """The OCI error body: `{"errors": [{"code", "message", "detail"?}]}`."""
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            entry["detail"] = self.detail
        return json.dumps({"errors": [entry]}).encode()


class NameInvalid(RegistryError):
    code = "NAME_INVALID"
    status = 400


class PaginationNumberInvalid(RegistryError):
    """`n` is not a non-negative integer (distribution's code; the OCI spec names none)."""

    code = "PAGINATION_NUMBER_INVALID"
    status = 400


class NameUnknown(RegistryError):
    code = "NAME_UNKNOWN"
    status = 404


class TagInvalid(RegistryError):
    code = "TAG_INVALID"
    status = 400


class DigestInvalid(RegistryError):
    code = "DIGEST_INVALID"
    status = 400


class ManifestUnknown(RegistryError):
    code = "MANIFEST_UNKNOWN"
    status = 404


class ManifestInvalid(RegistryError):
    code = "MANIFEST_INVALID"
    status = 502


class BlobUnknown(RegistryError):
    code = "BLOB_UNKNOWN"
    status = 404


class RangeNotSatisfiable(RegistryError):
    code = "RANGE_INVALID"
    status = 416

    def __init__(self, size: int) -> None:
        super().__init__("requested range not satisfiable", {"size": size})
        self.size = size

    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}


class Unsupported(RegistryError):
    code = "UNSUPPORTED"
    status = 405

    def headers(self) -> dict[str, str]:
        return {"Allow": "GET, HEAD"}


class ExpectationFailed(RegistryError):
    """An `Expect` other than 100-continue (RFC 9110 §10.1.1): no OCI code names it."""

    code = "UNSUPPORTED"
    status = 417


class RequestMalformed(RegistryError):
    """Bytes the HTTP parser refused (a line too long, a bad header or framing): no OCI
    code names them. The message says which fault, never quoting what was sent."""

    code = "UNSUPPORTED"
    status = 400


class Unauthorized(RegistryError):
    code = "UNAUTHORIZED"
    status = 401

    def __init__(self, message: str, challenge: str | None = None) -> None:
        super().__init__(message)
        self.challenge = challenge

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": self.challenge} if self.challenge else {}


class UpstreamUnauthorized(Unauthorized):
    """The upstream refused the mirror's credentials, or wants some it does not have."""

    from_upstream = True


class Denied(RegistryError):
    code = "DENIED"
    status = 403


class UpstreamDenied(Denied):
    """The upstream denied the mirror access (not the mirror's own pull policy)."""

    from_upstream = True


class TooManyRequests(RegistryError):
    code = "TOOMANYREQUESTS"
    status = 429
    from_upstream = True

    def __init__(self, message: str, retry_after: int = 60) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class TooManyLogins(RegistryError):
    """This user name at this client address, or the address, failed to log in too often:
    it must wait before trying again."""

    code = "TOOMANYREQUESTS"
    status = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed logins; try again later")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class LoginsBusy(RegistryError):
    """Every password check is taken: the mirror is too busy to check one more now."""

    code = "UNAVAILABLE"
    status = 503

    def __init__(self) -> None:
        super().__init__("too many logins at once; try again shortly")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UpstreamUnavailable(RegistryError):
    code = "UNAVAILABLE"
    status = 503
    from_upstream = True

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class DigestMismatch(UpstreamUnavailable):
    """The upstream sent content whose hash is not the digest asked for."""

    code = "DIGEST_INVALID"
    status = 502


class UpstreamMisdirected(UpstreamUnavailable):
    """The upstream sent the mirror somewhere it may not go (a redirect or a token realm
    on a host not allowed, or over plain HTTP): refused without asking there."""

    status = 502


class BlobTooLarge(RegistryError):
    """The upstream's blob is larger than storage.max_blob_size: refused, never cached. Not
    an outage (no Retry-After): asking again gets the same bytes."""

    code = "SIZE_INVALID"
    status = 502
    from_upstream = True


class EndpointUnknown(RegistryError):
    """A GET for a path the registry API does not have."""

    code = "UNSUPPORTED"
    status = 404
