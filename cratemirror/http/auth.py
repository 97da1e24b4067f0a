"""The request check: with `auth.required`, everything but the health probes (and, unless
`auth.protect_status`, the status page and /metrics) needs a known, unexpired, unrevoked token."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from cratemirror.auth.tokens import Reason, TokenChecker
from cratemirror.config.schema import AuthConfig
from cratemirror.http.responses import error
from cratemirror.http.routes import base_url
from cratemirror.metrics import Metrics

log = logging.getLogger("cratemirror.auth")

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


def token_checker(config: AuthConfig, metrics: Metrics) -> TokenChecker:
    """The worker's view of the tokens file; a broken one is logged and counted (and /readyz says
    degraded) while the last good set stays in force."""

    def broken(problem: str) -> None:
        metrics.tokens_file_errors.inc()
        log.error("tokens file unusable, keeping the last good set of tokens: %s", problem)

    return TokenChecker(config.tokens_file, on_problem=broken)


def auth_middleware(config: AuthConfig, metrics: Metrics, checker: TokenChecker | None = None) -> Middleware:
    checker = checker or token_checker(config, metrics)
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
