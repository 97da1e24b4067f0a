"""The request check: with `auth.required`, everything but the health probes (and, unless
`auth.protect_status`, the status page and /metrics) needs a known, unexpired, unrevoked token."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from cratemirror.auth.tokens import Reason, TokenChecker
from cratemirror.config.schema import AuthConfig
from cratemirror.http.responses import error
from cratemirror.http.routes import base_url
from cratemirror.metrics import Metrics

# The token's name (never the token) for the access log.
TOKEN_NAME = web.RequestKey("cratemirror.token_name", str)

ALWAYS_OPEN = frozenset({"/healthz", "/readyz"})
STATUS_PATHS = frozenset({"/", "/metrics"})
OPEN_PREFIXES = ("/toolchains/",)  # rustup sends no token: its toolchains are open (contract.md)

_EXPLAIN: dict[Reason, str] = {
    "missing": "token missing: this mirror needs a token (Authorization header); see the status page",
    "unknown": "token unknown: the token sent is not one of this mirror's",
    "expired": "token expired: ask for a new one",
    "revoked": "token revoked: ask for a new one",
}


def presented_token(request: web.Request) -> str | None:
    """`Authorization: <token>` (what cargo sends) or `Authorization: Bearer <token>`."""
    value = request.headers.get("Authorization", "").strip()
    scheme, _, rest = value.partition(" ")
    if rest and scheme.lower() == "bearer":
        value = rest.strip()
    return value or None


def auth_middleware(config: AuthConfig, metrics: Metrics) -> Middleware:
    checker = TokenChecker(config.tokens_file)
    open_paths = ALWAYS_OPEN if config.protect_status else ALWAYS_OPEN | STATUS_PATHS

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths or request.path.startswith(OPEN_PREFIXES):
            return await handler(request)
        verdict = checker.check(presented_token(request))
        if verdict.reason is None:
            assert verdict.name is not None
            request[TOKEN_NAME] = verdict.name
            return await handler(request)
        if verdict.name is not None:
            request[TOKEN_NAME] = verdict.name
        metrics.auth_failures.labels(verdict.reason).inc()
        response = error(401, _EXPLAIN[verdict.reason])
        response.headers["WWW-Authenticate"] = f'Cargo login_url="{base_url(request)}/"'
        return response

    return require_token
