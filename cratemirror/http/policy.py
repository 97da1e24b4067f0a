"""The policy's answers at the HTTP edge: the 403 for a blocked download, and who asked."""

from __future__ import annotations

from aiohttp import web

from cratemirror.http.clients import client_address
from cratemirror.http.responses import error

POLICY_HEADER = "X-Cratemirror-Policy"


def refusal(rule: str, reason: str, x_cache: str) -> web.Response:
    """403 with the rule in a header and one line that cargo prints under "body:"."""
    response = error(403, f"cratemirror policy: {reason}", x_cache)
    response.headers[POLICY_HEADER] = rule
    return response


def client_of(request: web.BaseRequest) -> str:
    """Who asked, for the audit line: the client address (client tokens, when they land, add a name)."""
    return client_address(request)
