"""create_app(config) -> web.Application: wires the store, upstream client and services together."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler

from cratemirror import routes, status_page
from cratemirror.config import Config
from cratemirror.context import MIRROR, Mirror
from cratemirror.crates import CrateService
from cratemirror.index import IndexService
from cratemirror.metrics import Metrics
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
    usage = await asyncio.to_thread(mirror.store.usage)
    mirror.store.set_crate_bytes(usage["crate"][0])  # exact again, whatever a crash left
    mirror.record_usage(usage)
    yield
    await mirror.crates.close()
    await mirror.index.close()
    await mirror.upstream.close()
    mirror.store.close()


@web.middleware
async def _instrument(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts client requests by kind and cache result, and times them (the contract's metrics)."""
    started = time.perf_counter()
    try:
        return await handler(request)
    finally:
        kind = request.get(routes.KIND)
        if kind is not None:
            metrics = request.app[MIRROR].metrics
            metrics.request_duration.labels(kind).observe(time.perf_counter() - started)
            metrics.cache_requests.labels(kind, request.get(routes.RESULT, "error")).inc()
            sent = request.get(routes.BYTES, 0)
            if sent:
                metrics.bytes_served.labels(kind).inc(sent)
