"""The audit of manifest requests: what the pull gate decided, in the request's one record.

The gate (gate.py) notes who pulls what on the request; the access logger (accesslog.py)
turns the note and the response into the audit fields once the response is sent and
writes them, with the access fields, as the request's one record on `mirror.audit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mirror.access.policy import Target
from mirror.web.forwarded import client_of


@dataclass(frozen=True)
class PendingAudit:
    """A manifest request the gate let through or refused (`reason`)."""

    target: Target
    subject: str
    reason: str | None = None


audit_key = web.RequestKey("audit", PendingAudit)


def audit_fields(
    pending: PendingAudit, request: web.BaseRequest, response: web.StreamResponse
) -> dict[str, Any]:
    """Who, from where, what, and how it ended (by the status the client got)."""
    status = response.status
    if pending.reason is not None:
        outcome = "denied"
    else:
        outcome = "served" if status < 400 else "failed"
    target = pending.target
    fields: dict[str, Any] = {
        "user": pending.subject or "anonymous",
        "client": client_of(request),  # the proxy's client with trusted_proxies
        "method": request.method,
        "upstream": target.upstream,
        "repository": target.repository,
        "reference": target.reference,
        "digest": response.headers.get("Docker-Content-Digest") or "-",
        "outcome": outcome,
        "status": status,
    }
    if pending.reason is not None:
        fields["reason"] = pending.reason
    return fields


def audit_text(fields: dict[str, Any]) -> str:
    """`user=bob client=… status=200`: the audit line's message after `pull `."""
    return " ".join(f"{key}={value}" for key, value in fields.items())
