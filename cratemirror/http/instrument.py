"""The counted routes' hook: times a client request of the index, download or config routes, counts it by
kind and cache result (the contract's metrics), and keeps its upstream time for the access log and the
status page's recent misses.

A decorator on those routes rather than an application middleware: a middleware runs on every request
(and makes aiohttp build a handler chain around each one), while only these routes are counted.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from cratemirror.http.context import MIRROR, TIMING, RecentMiss
from cratemirror.http.crate_answers import DownloadAsked
from cratemirror.metrics import RequestTiming, start_request_timing
from cratemirror.names import DEFAULT_REGISTRY

# Keys on the request that the handlers set and the hook reads.
KIND = web.RequestKey("cratemirror.kind", str)
RESULT = web.RequestKey("cratemirror.result", str)
BYTES = web.RequestKey("cratemirror.bytes", int)
REGISTRY = web.RequestKey("cratemirror.registry", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def start_timing(request: web.BaseRequest) -> None:
    """Time any request from the start of its handling (the server calls this for every request, so the
    access log has a fine-grained duration: uvloop's loop.time() counts whole milliseconds)."""
    request[TIMING] = start_request_timing()


def instrumented(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def counted(request: web.Request) -> web.StreamResponse:
        try:
            timing = request[TIMING]  # started by the server for every request
        except KeyError:
            timing = request[TIMING] = start_request_timing()
        status = 500
        headers: Mapping[str, str] = _NO_HEADERS
        try:
            response = await handler(request)
            status, headers = response.status, response.headers
            return response
        except web.HTTPException as exc:
            status, headers = exc.status, exc.headers
            raise
        finally:
            _record(request, timing, status, headers)

    return counted


_NO_HEADERS: Mapping[str, str] = {}


def _record(request: web.Request, timing: RequestTiming, status: int, headers: Mapping[str, str]) -> None:
    try:
        kind = request[KIND]  # unset: the request was refused before it was a client request of a kind
    except KeyError:
        return
    elapsed = time.perf_counter() - timing.started
    result = request[RESULT]
    sent = 0
    if request.method != "HEAD":
        try:  # noqa: SIM105 (contextlib.suppress costs a context manager per request)
            sent = request[BYTES]
        except KeyError:
            pass
    mirror = request.app[MIRROR]
    name = request.match_info.get("registry")  # crates.io's routes have none
    registry = mirror.registries.get(name) if name is not None else None
    metrics = registry.metrics if registry is not None else mirror.metrics
    metrics.observe_request(kind, result, elapsed, sent)
    if kind == "crate" and mirror.on_download is not None:  # the audit trail's hook (http/audit.py)
        match = request.match_info  # the registry segment was looked up before the kind was set
        mirror.on_download(request, DownloadAsked(name or DEFAULT_REGISTRY, match.get("name", ""),
                                                  match.get("version", "")), status, headers)  # fmt: skip
    if result in ("miss", "error"):  # as /metrics counts them: an upstream failure is no hit
        mirror.recent_misses.append(
            RecentMiss(time.time(), kind, request.path, status, elapsed, timing.upstream_seconds)
        )
