"""create_app(config) -> web.Application: wires the store, upstream client and services together."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from cratemirror import routes, status_page
from cratemirror.config import Config
from cratemirror.context import MIRROR, Mirror, RecentMiss
from cratemirror.crates import CrateService
from cratemirror.index import IndexService
from cratemirror.metrics import TIMING, Metrics, start_request_timing
from cratemirror.store import DiskTrouble, Store
from cratemirror.upstream import Upstream

log = logging.getLogger("cratemirror")


def create_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    metrics = metrics or Metrics()
    store = Store(config.cache.dir)
    upstream = Upstream(config.upstream, metrics)
    disk_trouble = DiskTrouble()
    index = IndexService(
        store, upstream, metrics, config.cache, offline=config.offline, disk_trouble=disk_trouble
    )
    crates = CrateService(
        store, index, upstream, metrics,
        offline=config.offline, max_size=config.cache.max_size, disk_trouble=disk_trouble,
    )  # fmt: skip
    mirror = Mirror(config, metrics, store, upstream, index, crates, disk_trouble)

    app = web.Application(middlewares=[_instrument], handler_args={"max_field_size": 8190})
    app[MIRROR] = mirror
    app.add_routes(routes.routes)
    app.add_routes(status_page.routes)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    mirror = app[MIRROR]
    removed = mirror.store.clean_stale_temp_files()
    if removed:
        log.info("removed %d partial downloads left by an earlier run", removed)
    if not mirror.config.offline:
        await mirror.upstream.start()
    try:
        # What a crash left half done (a few rows, never a walk of the cache): totals exact again.
        settled = await asyncio.to_thread(mirror.store.settle)
        if settled:
            log.info("settled %d crate commits or evictions left by an earlier run", settled)
        mirror.record_usage(mirror.store.usage())
    except (OSError, sqlite3.Error) as exc:  # a full disk: keep serving, /readyz says why
        mirror.disk_trouble.report(f"could not settle the cache at start-up: {exc}")
    yield
    await mirror.crates.close()
    await mirror.index.close()
    await mirror.upstream.close()
    mirror.store.close()


@web.middleware
async def _instrument(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts client requests by kind and cache result, times them (the contract's metrics), and keeps
    the request's upstream time for the access log and the status page's recent misses."""
    timing = request[TIMING] = start_request_timing()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        kind = request.get(routes.KIND)
        if kind is not None:
            mirror = request.app[MIRROR]
            elapsed = time.perf_counter() - timing.started
            result = request.get(routes.RESULT, "error")
            sent = 0 if request.method == "HEAD" else request.get(routes.BYTES, 0)
            mirror.metrics.observe_request(kind, result, elapsed, sent)
            if result == "miss":
                mirror.recent_misses.append(
                    RecentMiss(time.time(), kind, request.path, status, elapsed, timing.upstream_seconds)
                )
