"""The audit trail's one hook: every download answered or refused is recorded as its handler finishes.

The counted routes' hook (`http/instrument.py`) calls `Mirror.on_download` for every download request,
whichever branch of the route answered it (a file, a fill, a redirect, a 304, a policy refusal, an
error), so the route itself carries no recording code and no response pays a signal of its own. Who:
the token's name when auth is on, else the client (`client_of`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping

from aiohttp import web

from cratemirror.cache.audit import BLOCKED, FAILED, NOT_FOUND, SERVED, AuditTrail
from cratemirror.fleet.storage import LocalShared
from cratemirror.http.auth import TOKEN_NAME
from cratemirror.http.context import MIRROR
from cratemirror.http.crate_answers import DownloadAsked
from cratemirror.http.policy import POLICY_HEADER, client_of
from cratemirror.names import DEFAULT_REGISTRY

AUDIT = web.AppKey("audit", AuditTrail)

_SERVED_STATUSES = frozenset({200, 206, 302, 304})


def install_audit(app: web.Application) -> None:
    """Create the worker's trail (audit.retention 0: a trail that records nothing) and hook it in."""
    mirror = app[MIRROR]
    shared = mirror.registries[DEFAULT_REGISTRY].shared
    trail = AuditTrail(
        mirror.config.cache.dir,
        mirror.config.audit.retention,
        None if isinstance(shared, LocalShared) else shared,
    )
    app[AUDIT] = trail
    if trail.enabled:
        mirror.on_download = _recorder(trail, mirror.config.auth.required)
        app.cleanup_ctx.append(_lifecycle)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    trail = app[AUDIT]
    await trail.start()
    yield
    await trail.close()  # the last records are written (and uploaded) before the storage closes


Hook = Callable[[web.BaseRequest, DownloadAsked, int, Mapping[str, str]], None]


def _recorder(trail: AuditTrail, auth_required: bool) -> Hook:
    """The hook, with what it needs bound once (it runs for every download: a few attribute reads)."""
    record = trail.record

    def on_download(
        request: web.BaseRequest, asked: DownloadAsked, status: int, headers: Mapping[str, str]
    ) -> None:
        if request.method != "GET":
            return  # a HEAD takes nothing
        rule = ""
        if status in _SERVED_STATUSES:
            result = SERVED
        elif status == 403:
            result, rule = BLOCKED, headers.get(POLICY_HEADER, "")
        elif status == 404:
            result = NOT_FOUND
        elif status == 400:
            return  # not a crate version: nothing was asked for that could be recorded
        else:
            result = FAILED
        # A token name only exists with auth on (a missing key costs an exception inside request.get).
        who = (request.get(TOKEN_NAME) if auth_required else None) or client_of(request)
        record(asked.registry, asked.name, asked.version, result, rule, who)

    return on_download
