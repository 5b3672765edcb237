"""The pull gate: every repository request passes the pull policy; manifests are audited.

It runs after client auth (which names the user) and before the handlers, so a refused
pull never reaches an upstream. Every manifest request, GET and HEAD, leaves a line on the
`mirror.audit` logger: HEAD too, because Docker and containerd resolve a tag with a HEAD
and then GET the manifest by digest, so the GETs alone would not say which tag was pulled
(and a tag-specific deny refuses the HEAD). The gate notes the request for that line
(audit.py); the access logger writes it once the answer is sent.

A request by tag names no digest, so the manifest handler asks the gate again once the tag
is resolved (`check_served`): an `@digest` deny refuses the manifest by tag as by digest.
"""

from __future__ import annotations

from aiohttp import web

from mirror.access.policy import NO_RULE, Policy, Target
from mirror.config import DOCKER_HUB_HOSTS
from mirror.oci.errors import Denied
from mirror.oci.reference import is_digest_reference, parse_digest, validate_tag
from mirror.upstream.client import Upstream
from mirror.upstream.routing import Upstreams
from mirror.util.lru import LRU
from mirror.web.accesslog import upstream_name_key
from mirror.web.audit import PendingAudit, audit_key
from mirror.web.keys import metrics_key, upstreams_key

# The user a request was authenticated as; "" or absent: an anonymous client.
subject_key = web.RequestKey("subject", str)
REPOSITORY_ROUTES = frozenset({"manifest", "blob", "tags", "referrers"})
# Decisions remembered: repositories and references are the client's choice, so bounded.
DECISIONS = 4096
_ALLOWED = ""  # a remembered "may pull" (the LRU holds no None)
# A request's route, worked out once: by the pull gate, then read by the handler.
route_key: web.RequestKey[tuple[Upstream, str]] = web.RequestKey("route")


def route(request: web.Request) -> tuple[Upstream, str]:
    """The upstream this request is for, and the repository's name there."""
    found = request.get(route_key)
    if found is None:
        upstreams = request.app[upstreams_key]
        found = upstreams.validated_route(request.match_info["name"], request.query.get("ns"))
        request[route_key] = found
        request[upstream_name_key] = found[0].name  # for the access line
    return found


class PullGate:
    """The policy's decisions for the configured upstreams, remembered per subject and
    target. The policy is fixed for the life of the process (rules name their users when
    the config is read), so a decision never goes stale: a new policy is a new gate, and
    an htpasswd reload changes who can log in, not what a user name may pull."""

    def __init__(
        self, policy: Policy | None, upstreams: Upstreams, *, challenges: bool = False
    ) -> None:
        self.policy = policy
        # Whether clients log in (client auth): then a client without credentials that only
        # a user's rule would let pull is challenged, not refused (AnonymousRefused).
        self.challenges = challenges
        # Whether the digest a tag resolves to can be refused where the tag was not.
        self.names_digests = policy is not None and policy.names_digests
        self._upstreams = upstreams
        self._aliases: dict[str, frozenset[str]] = {}
        self._decisions: LRU[tuple[str, str, str, str | None], str] = LRU(DECISIONS)
        self._targets: LRU[tuple[str, str, str | None], Target] = LRU(DECISIONS)

    def target(self, upstream: Upstream, repository: str, reference: str | None = None) -> Target:
        """What a request pulls, with every name the router knows its upstream by."""
        key = (upstream.name, repository, reference)
        target = self._targets.get(key)
        if target is None:
            target = self._target(upstream, repository, reference)
            self._targets.put(key, target)
        return target

    def _target(self, upstream: Upstream, repository: str, reference: str | None) -> Target:
        aliases = self._aliases.get(upstream.name)
        if aliases is None:
            names = {a for a in DOCKER_HUB_HOSTS if self._upstreams.get(a) is upstream}
            aliases = self._aliases[upstream.name] = frozenset({upstream.name} | names)
        default = upstream is self._upstreams.default
        return Target(upstream.name, aliases, default, repository, reference)

    def refusal(self, subject: str, target: Target) -> str | None:
        """Why `subject` may not pull `target` (a reason word), or None when it may."""
        if self.policy is None:
            return None
        key = (subject, target.upstream, target.repository, target.reference)
        decided = self._decisions.get(key)
        if decided is None:
            decided = self.policy.refusal(subject, target) or _ALLOWED
            self._decisions.put(key, decided)
        return decided or None

    def may_pull_name(self, subject: str, name: str) -> bool:
        """Whether `subject` may pull anything of the repository a client calls `name`, by
        any route (`?ns=` is not in a token scope): what a `/token` grant is narrowed to."""
        if self.policy is None:
            return True
        upstreams = self._upstreams
        candidates = [upstreams.route(name, None), *((upstream, name) for upstream in upstreams)]
        return any(
            self.refusal(subject, self.target(upstream, repository)) is None
            for upstream, repository in candidates
        )


gate_key = web.AppKey("pull_gate", PullGate)


def may_pull_name(app: web.Application, subject: str, name: str) -> bool:
    return app[gate_key].may_pull_name(subject, name)


def _reference(request: web.Request) -> str | None:
    """The manifest reference, validated (so that the audit line holds no junk)."""
    reference = request.match_info.get("reference")
    if reference is None:
        return None
    if is_digest_reference(reference):
        return str(parse_digest(reference))
    return validate_tag(reference)


def check_pull(request: web.Request) -> None:
    """Refuse (403 DENIED) what the policy does not allow; note manifest requests for the
    audit line, refused ones included."""
    if request.match_info.route.name not in REPOSITORY_ROUTES:
        return
    upstream, repository = route(request)
    gate = request.app[gate_key]
    target = gate.target(upstream, repository, _reference(request))
    subject = request.get(subject_key, "")
    reason = gate.refusal(subject, target)
    if target.reference is not None:
        request[audit_key] = PendingAudit(target, subject, reason)
    if reason is not None:
        if (
            gate.challenges
            and reason == NO_RULE
            and not subject
            and "Authorization" not in request.headers
        ):
            # No rule lets anonymous clients pull it, but one may let a user: the client
            # may hold credentials it sends only once challenged (web/access.py).
            raise _denied(request.match_info["name"], target.reference, AnonymousRefused)
        request.app[metrics_key].pulls_denied.labels(upstream.name, reason).inc()
        raise _denied(request.match_info["name"], target.reference)


def check_served(request: web.Request, digest: str, index: str | None) -> None:
    """Refuse (403 DENIED, as by digest) the manifest a tag resolved to, before any of it
    goes out, when the policy denies its digest or that of the list it was picked from
    (`index`; a client reading no lists gets a list's linux/amd64 manifest by tag).

    A list's children are not refused for the list's sake: asked for by digest they name
    no list, and one manifest is often a child of several lists. Nor is a list for its
    children's: it names them, and each is refused when it is asked for."""
    gate = request.app[gate_key]
    if not gate.names_digests:
        return
    pending = request[audit_key]
    for served in (digest, index):
        if served is None or served == pending.target.reference:
            continue  # by digest: the gate asked about it already
        upstream, repository = route(request)
        reason = gate.refusal(pending.subject, gate.target(upstream, repository, served))
        if reason is not None:
            pending.reason, pending.digest = reason, served
            request.app[metrics_key].pulls_denied.labels(pending.target.upstream, reason).inc()
            raise _denied(request.match_info["name"], served)


class AnonymousRefused(Denied):
    """A client that sent no credentials may not pull this, a user may: a 403 unless the
    client is challenged for its credentials instead."""


def _denied(name: str, reference: str | None, kind: type[Denied] = Denied) -> Denied:
    """The refusal names the repository as the client asked for it, never the rule."""
    shown = name
    if reference is not None:
        shown += ("@" if is_digest_reference(reference) else ":") + reference
    return kind(
        f"pulling {shown} is not allowed by this mirror's policy",
        {"repository": name, "reference": reference},
    )
