"""The pull gate: every repository request passes the pull policy; manifests are audited.

The middleware runs after client auth (which names the user) and before the handlers, so
a refused pull never reaches an upstream. Every manifest request, GET and HEAD, leaves a
line on the `mirror.audit` logger: HEAD too, because Docker and containerd resolve a tag
with a HEAD and then GET the manifest by digest, so the GETs alone would not say which
tag was pulled (and a tag-specific deny refuses the HEAD).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from mirror.access.policy import Target
from mirror.config import DOCKER_HUB_HOSTS
from mirror.oci.errors import Denied, RegistryError
from mirror.oci.reference import is_digest_reference, parse_digest, validate_tag
from mirror.upstream.client import Upstream
from mirror.upstream.routing import Upstreams
from mirror.web.forwarded import client_of
from mirror.web.handlers import route
from mirror.web.keys import metrics_key, policy_key, upstreams_key

# The user a request was authenticated as; "" or absent: an anonymous client.
subject_key = web.RequestKey("subject", str)
audit_log = logging.getLogger("mirror.audit")
REPOSITORY_ROUTES = frozenset({"manifest", "blob", "tags", "referrers"})


def target_of(
    upstreams: Upstreams, upstream: Upstream, repository: str, reference: str | None = None
) -> Target:
    """What a request pulls, with every name the router knows its upstream by."""
    aliases = {upstream.name} | {a for a in DOCKER_HUB_HOSTS if upstreams.get(a) is upstream}
    return Target(
        upstream.name, frozenset(aliases), upstream is upstreams.default, repository, reference
    )


def may_pull_name(app: web.Application, subject: str, name: str) -> bool:
    """Whether `subject` may pull anything of the repository a client calls `name`, by any
    route (`?ns=` is not in a token scope): what a `/token` grant is narrowed to."""
    policy = app[policy_key]
    if policy is None:
        return True
    upstreams = app[upstreams_key]
    candidates = [upstreams.route(name, None), *((upstream, name) for upstream in upstreams)]
    return any(
        policy.refusal(subject, target_of(upstreams, upstream, repository)) is None
        for upstream, repository in candidates
    )


def _reference(request: web.Request) -> str | None:
    """The manifest reference, validated (so that the audit line holds no junk)."""
    reference = request.match_info.get("reference")
    if reference is None:
        return None
    if is_digest_reference(reference):
        return str(parse_digest(reference))
    return validate_tag(reference)


@web.middleware
async def pull_policy_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse (403 DENIED) what the policy does not allow; audit manifest requests."""
    if request.match_info.route.name not in REPOSITORY_ROUTES:
        return await handler(request)
    upstream, repository = route(request)
    target = target_of(request.app[upstreams_key], upstream, repository, _reference(request))
    policy = request.app[policy_key]
    subject = request.get(subject_key, "")
    reason = None if policy is None else policy.refusal(subject, target)
    if reason is not None:
        request.app[metrics_key].pulls_denied.labels(upstream.name, reason).inc()
        denied = _denied(request.match_info["name"], target.reference)
        if target.reference is not None:
            audit(request, target, subject, "denied", denied.status, reason=reason)
        raise denied
    if target.reference is None:
        return await handler(request)
    try:
        response = await handler(request)
    except RegistryError as exc:
        audit(request, target, subject, "failed", exc.status)
        raise
    except Exception:
        audit(request, target, subject, "failed", 500)
        raise
    outcome = "served" if response.status < 400 else "failed"
    digest = response.headers.get("Docker-Content-Digest")
    audit(request, target, subject, outcome, response.status, digest=digest)
    return response


def _denied(name: str, reference: str | None) -> Denied:
    """The refusal names the repository as the client asked for it, never the rule."""
    shown = name
    if reference is not None:
        shown += ("@" if is_digest_reference(reference) else ":") + reference
    return Denied(
        f"pulling {shown} is not allowed by this mirror's policy",
        {"repository": name, "reference": reference},
    )


def audit(
    request: web.Request,
    target: Target,
    subject: str,
    outcome: str,
    status: int,
    *,
    digest: str | None = None,
    reason: str | None = None,
) -> None:
    """One line per manifest request: who, from where, what, and how it ended."""
    fields: dict[str, Any] = {
        "user": subject or "anonymous",
        "client": client_of(request),
        "method": request.method,
        "upstream": target.upstream,
        "repository": target.repository,
        "reference": target.reference,
        "digest": digest or "-",
        "outcome": outcome,
        "status": status,
    }
    if reason is not None:
        fields["reason"] = reason
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    # The JSON formatter adds the `access` mapping of a record to its object.
    audit_log.info("pull %s", text, extra={"access": fields})
