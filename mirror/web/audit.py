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


@dataclass(slots=True)  # not frozen: one per manifest request, and frozen costs 4x
class PendingAudit:
    """A manifest request the gate let through or refused (`reason`)."""

    target: Target
    subject: str
    reason: str | None = None
    # The digest a tag resolved to, when that digest was refused (no header says it then).
    digest: str | None = None


audit_key = web.RequestKey("audit", PendingAudit)


def _outcome(pending: PendingAudit, status: int) -> str:
    if pending.reason is not None:
        return "denied"
    return "served" if status < 400 else "failed"


def _digest(pending: PendingAudit, response: web.StreamResponse) -> str:
    return response.headers.get("Docker-Content-Digest") or pending.digest or "-"


def audit_fields(
    pending: PendingAudit, request: web.BaseRequest, response: web.StreamResponse
) -> dict[str, Any]:
    """Who, from where, what, and how it ended (by the status the client got)."""
    status = response.status
    target = pending.target
    fields: dict[str, Any] = {
        "user": pending.subject or "anonymous",
        "client": client_of(request),  # the proxy's client with trusted_proxies
        "method": request.method,
        "upstream": target.upstream,
        "repository": target.repository,
        "reference": target.reference,
        "digest": _digest(pending, response),
        "outcome": _outcome(pending, status),
        "status": status,
    }
    if pending.reason is not None:
        fields["reason"] = pending.reason
    return fields


def audit_text(pending: PendingAudit, response: web.StreamResponse) -> str:
    """`user=bob repository=… outcome=served`: what the audit line says after the access
    line (the client, method and status are in that already)."""
    target = pending.target
    text = (
        f"user={pending.subject or 'anonymous'} repository={target.repository} "
        f"reference={target.reference} "
        f"digest={_digest(pending, response)} "
        f"outcome={_outcome(pending, response.status)}"
    )
    return text if pending.reason is None else f"{text} reason={pending.reason}"
