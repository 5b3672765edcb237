"""Who may pull: client auth for every API request, and the `/token` endpoint.

Password checks are the one costly thing a stranger can ask for, so they run on their own
small pool (mirror/access/hashing.py), and a user name that keeps failing at an address (or
an address that keeps failing) is refused before any check (mirror/access/throttle.py);
credentials verified lately pass without either.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import Counter

from mirror.access.clientauth import (
    Htpasswd,
    load_signing_key,
    parse_basic,
    requested_repositories,
)
from mirror.access.clienttokens import Grant, TokenRefused, TokenSigner
from mirror.access.hashing import HashPool, HashPoolFull
from mirror.access.throttle import FailureThrottle, Throttled, holder
from mirror.cluster.signing import token_audience, token_signing_key
from mirror.observe.guard_metrics import GuardMetrics
from mirror.oci.errors import LoginsBusy, TooManyLogins, Unauthorized
from mirror.oci.reference import is_valid_name
from mirror.web.catalog import may_list
from mirror.web.forwarded import client_of, origin_of
from mirror.web.gate import may_pull_name, subject_key
from mirror.web.keys import config_key, metrics_key, policy_key


def client_address(request: web.Request) -> str:
    """The address a request came from, as login throttling counts it (a trusted proxy's
    client, not the proxy: web/forwarded.py)."""
    return client_of(request)


# Routes for operators, not clients: behind a login with metrics.require_auth.
MONITORING_ROUTES = frozenset({"metrics", "status"})


class ClientAuth:
    """htpasswd users, the token signer and the policy for anonymous clients."""

    def __init__(
        self,
        htpasswd: Htpasswd,
        signer: TokenSigner,
        anonymous_pull: bool,
        token_ttl: float,
        public_url: str | None,
        metrics: GuardMetrics,
        refused: Counter,
        throttle: FailureThrottle | None = None,
        audience: str | None = None,
    ) -> None:
        self.htpasswd = htpasswd
        # A fixed audience for replicas with no public_url: the service each names in its
        # challenge is its own address, yet every replica must take every replica's tokens.
        self.fixed_audience = audience
        self.metrics = metrics
        self.refused = refused  # mirror_client_auth_refused_total
        self.throttle = throttle or FailureThrottle()
        self.signer = signer
        self.anonymous_pull = anonymous_pull
        self.token_ttl = token_ttl
        self.public_url = public_url

    def base_url(self, request: web.Request) -> str:
        """The URL clients reach the mirror at: configured, or the request's (proxy
        headers believed from trusted_proxies only: web/forwarded.py)."""
        if self.public_url:
            return self.public_url
        origin = origin_of(request)
        return f"{origin.scheme}://{origin.host}"

    def service(self, request: web.Request) -> str:
        """The service the challenge names: the audience of the tokens issued for it."""
        return service_of(self.base_url(request))

    def audience(self, request: web.Request) -> str:
        """The audience of the tokens issued and accepted here."""
        return self.fixed_audience or self.service(request)

    def challenge(
        self, request: web.Request, repository: str | None, invalid_token: bool = False
    ) -> Unauthorized:
        base = self.base_url(request)
        header = f'Bearer realm="{base}/token",service="{service_of(base)}"'
        # Only a valid name goes in the header: a decoded path may hold CR, LF or quotes.
        if repository and is_valid_name(repository):
            header += f',scope="repository:{repository}:pull"'
        if invalid_token:  # RFC 6750: the client asks the realm for a new token
            header += ',error="invalid_token"'
            return Unauthorized("the token is expired or not valid here", challenge=header)
        return Unauthorized("authentication required", challenge=header)

    async def check(self, request: web.Request) -> Grant | None:
        """The grant of the request's credentials; None when it has none or bad ones."""
        try:
            return await self.credentials(request)
        except TokenRefused:
            return None

    async def credentials(self, request: web.Request) -> Grant | None:
        """`check`, but a Bearer token the mirror refuses is TokenRefused (counted)."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            try:
                return self.signer.verify(value.strip(), self.audience(request))
            except TokenRefused as exc:
                self.refused.labels(exc.reason).inc()
                raise
        _, user = await self._basic_login(request, header)
        return None if user is None else Grant(user, frozenset({"*"}))

    async def _basic_login(self, request: web.Request, header: str) -> tuple[bool, str | None]:
        """(whether Basic credentials were sent, the user they log in as, if any); a
        header that logs no one in is counted as refused."""
        basic = parse_basic(header) if header else None
        if basic is not None and await self.login(request, *basic):
            return True, basic[0]
        if header:
            self.refused.labels("password" if basic is not None else "malformed").inc()
        return basic is not None, None

    async def login(self, request: web.Request, username: str, password: str) -> bool:
        """Whether the credentials are good; TooManyLogins when the user name at the
        client's address, or the address, has failed too often, LoginsBusy when no
        password check can be queued."""
        if await self.htpasswd.remembered(username, password):
            return True  # never throttled: no bcrypt work to protect
        pending = self.htpasswd.pending(username, password)
        if pending is not None:  # the same check under way: its answer, counted once
            return await self._checked(pending)
        address = client_address(request)
        throttled = self.throttle.reserve(address, username)
        if throttled is not None:
            self.metrics.auth_throttled.inc()
            if self._anonymous_instead(throttled, username):
                return False
            raise TooManyLogins(throttled.retry_after)
        try:
            ok = await self._checked(self.htpasswd.verify(username, password, holder(address)))
        except LoginsBusy:
            self.throttle.release(address, username)  # nothing was checked
            raise
        if ok:  # a failure was counted ahead of the check, in case it failed
            self.throttle.release(address, username)
        return ok

    async def _checked(self, check: Awaitable[bool]) -> bool:
        try:
            return await check
        except HashPoolFull:
            self.metrics.auth_busy.inc()
            raise LoginsBusy() from None

    def _anonymous_instead(self, throttled: Throttled, username: str) -> bool:
        """Whether a login not checked now is anonymous rather than refused: where
        anonymous clients may pull, a name that is no user's and has failed at its own
        bound here (Docker sends its Docker Hub login with every pull, moby#42022). A
        user's is refused (pulling anonymously would refuse what the user may pull, with
        a 403 it never retries), and so is any name at an address past the address's own
        bound (there, answering a user's and a stranger's apart would tell for free which
        names exist)."""
        return self.anonymous_pull and throttled.user and not self.htpasswd.knows(username)

    async def require_user(self, request: web.Request) -> str:
        """The user, or Unauthorized (a Basic challenge: browsers and Prometheus answer it)
        unless the request carries a logged-in user's credentials; anonymous_pull grants
        nothing here."""
        grant = await self.check(request)
        if grant is None or not grant.subject:
            raise Unauthorized("authentication required", challenge='Basic realm="mirror"')
        return grant.subject

    async def viewer(self, request: web.Request) -> str:
        """The user of a page open to anyone that shows each user their own: "" (anonymous)
        for no credentials, bad ones, or ones that cannot be checked now."""
        try:
            grant = await self.check(request)
        except (TooManyLogins, LoginsBusy):
            return ""
        return grant.subject if grant is not None else ""

    async def token(self, request: web.Request) -> web.Response:
        """`GET /token`: a pull token for the requested repositories."""
        sent, user = await self._basic_login(request, request.headers.get("Authorization", ""))
        if user is not None:
            subject = user
        else:
            if not self.anonymous_pull:
                message = "invalid username or password" if sent else "credentials required"
                raise Unauthorized(message, challenge='Basic realm="mirror"')
            # Docker sends the user's Docker Hub login to a mirror's realm (moby#42022):
            # where anonymous pulls are allowed, credentials of no user pull anonymously.
            subject = ""
        repositories = requested_repositories(request.query.getall("scope", []))
        # A narrower grant than asked (as Docker's token spec allows): a repository the
        # policy refuses is listed with no actions, so that clients learn early.
        refused = [name for name in repositories if not may_pull_name(request.app, subject, name)]
        allowed = [name for name in repositories if name not in refused]
        token, expires_in = self.signer.issue(
            subject, allowed, self.token_ttl, refused, audience=self.audience(request)
        )
        return web.json_response({"token": token, "access_token": token, "expires_in": expires_in})


def service_of(base: str) -> str:
    """The host of the mirror's base URL, the `service` of its tokens."""
    try:
        return urlsplit(base).netloc
    except ValueError:  # a Host header no URL can hold ("[::1"): the client's own text
        return base.partition("://")[2]


def repository_of(request: web.Request) -> str | None:
    """The repository an API request is about (None for `/v2/` and `_catalog`)."""
    return request.match_info.get("name")


client_auth_key = web.AppKey("client_auth", ClientAuth)


async def token_handler(request: web.Request) -> web.Response:
    return await request.app[client_auth_key].token(request)


async def authorize(request: web.Request) -> None:
    """Refuse API requests without a grant for their repository (when auth is on), and
    name the user on the request for the pull gate."""
    auth = request.app.get(client_auth_key)
    if auth is None:
        return
    route = request.match_info.route.name
    if route in MONITORING_ROUTES:
        if request.app[config_key].metrics.require_auth:
            request[subject_key] = await auth.require_user(request)
        elif route == "status":  # open to anyone, yet it names what its viewer may pull
            request[subject_key] = await auth.viewer(request)
        return
    if not request.path.startswith("/v2"):
        return
    repository = repository_of(request)
    try:
        grant = await auth.credentials(request)
    except TokenRefused:
        # Even where anonymous pulls are allowed: the client meant to be someone, and a
        # challenge makes it fetch a new token (an expired one, mid-pull), where pulling
        # anonymously would refuse what its user may pull, with a 403 it never retries.
        raise auth.challenge(request, repository, invalid_token=True) from None
    if grant is None and auth.anonymous_pull:
        if route == "base":
            # Docker learns from this ping alone whether to log in: answered without a
            # challenge, a later 401 is an error it never answers with its login (and
            # `docker login` checks nothing). Anonymous clients fetch an anonymous token.
            raise auth.challenge(request, None)
        return
    if grant is None:
        raise auth.challenge(request, repository)
    request[subject_key] = grant.subject
    # A token without the repository because the policy refuses it: a new token would not
    # help, so the pull gate answers 403 instead of a challenge.
    if not grant.allows(repository) and may_pull_name(request.app, grant.subject, repository or ""):
        raise auth.challenge(request, repository)


def shown_repositories(request: web.Request) -> Callable[[str], bool]:
    """Which repository names a page on a client listener may show the request's client:
    those the catalogue lists for it, none where it could not even ask for the catalogue
    (an anonymous client where only users may pull)."""
    app, subject = request.app, request.get(subject_key, "")
    auth = app.get(client_auth_key)
    if auth is not None and not subject and not auth.anonymous_pull:
        return lambda name: False
    return lambda name: may_list(app, subject, name)


async def client_auth_ctx(app: web.Application) -> AsyncIterator[None]:
    """Client auth when `auth.htpasswd` is set, with its password-check pool."""
    htpasswd = app[config_key].auth.htpasswd
    if htpasswd is None:
        yield
        return
    pool = HashPool()
    users = Htpasswd(htpasswd, pool)
    await users.load()
    app[client_auth_key] = await _client_auth(app, users)
    yield
    pool.close()


async def _client_auth(app: web.Application, htpasswd: Htpasswd) -> ClientAuth:
    """Load the signing key (shared by replicas, or generated) and build the ClientAuth."""
    config, policy = app[config_key], app[policy_key]
    audience = None
    if config.cluster is not None and config.public_url is None:
        audience = token_audience(config.cluster.secret)
    if config.cluster is not None and config.auth.signing_key_file is None:
        # Replicas share no disk: each derives the same key from the cluster secret.
        key = token_signing_key(config.cluster.secret)
    else:
        key_file = config.auth.signing_key_file or config.storage.path / "auth" / "signing.key"
        key = await asyncio.to_thread(load_signing_key, key_file)
    return ClientAuth(
        htpasswd,
        TokenSigner(key),
        # A rule naming anonymous clients lets them pull (what it grants).
        config.auth.anonymous_pull or bool(policy and policy.names_anonymous),
        config.auth.token_ttl,
        config.public_url,
        app[metrics_key].guard,
        app[metrics_key].client_auth_refused,
        audience=audience,
    )


def challenge_instead(request: web.Request) -> Unauthorized:
    """A 401 challenge for a request without credentials that the policy refuses to
    anonymous clients alone (it got past `authorize`: anonymous clients may pull some
    repositories). Docker and containerd send their login only once challenged: with a
    403 a user could never pull what only users may. A client without a login comes
    back with an anonymous token and gets the 403 then."""
    return request.app[client_auth_key].challenge(request, repository_of(request))
