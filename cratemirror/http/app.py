"""create_app(config) -> web.Application: wires the store, upstream client and services together."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from cratemirror.cache.ratelimit import FILE_NAME as BUDGET_FILE
from cratemirror.cache.ratelimit import UnknownNameBudget
from cratemirror.cache.registry import build_registries
from cratemirror.config.schema import Config
from cratemirror.fleet.storage import LocalShared
from cratemirror.fleet.storage.disk import DiskTrouble
from cratemirror.http import routes, search, status_page, toolchains
from cratemirror.http.audit import install_audit
from cratemirror.http.auth import auth_middleware, token_checker
from cratemirror.http.context import MIRROR, Mirror
from cratemirror.http.crate_answers import CrateAnswers
from cratemirror.http.index_answers import IndexAnswers
from cratemirror.metrics import Metrics
from cratemirror.names import DEFAULT_REGISTRY
from cratemirror.policy.service import create_policy

log = logging.getLogger("cratemirror")


def create_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    metrics = metrics or Metrics()
    disk_trouble = DiskTrouble()
    registries = build_registries(config, metrics, disk_trouble)
    default = registries[DEFAULT_REGISTRY]
    # The policy gates crates.io's crates; in a fleet it shares first-seen times and reads audit records.
    fleet = None if isinstance(default.shared, LocalShared) else default.shared
    policy = create_policy(config, default.store, metrics, fleet)
    if policy.enabled:  # the policy gates crates.io's downloads, and what it blocks is never prefetched
        default.crates.gate = policy
        default.index.prefetch.allowed = lambda name, version: not policy.blocks(name, version)
    mirror = Mirror(config, metrics, disk_trouble, policy, registries)
    mirror.unknown_names = UnknownNameBudget(config.cache.dir / BUDGET_FILE, default.coordination)
    mirror.index_answers = IndexAnswers(config.cache.memory_size)
    mirror.crate_answers = CrateAnswers(config.cache.memory_size // 4)
    for name, registry in registries.items():
        mirror.index_answers.watch(name, registry.index)

    middlewares: list[Middleware] = []  # none on the hit path: the counted routes carry their own hook
    if config.auth.required:
        mirror.tokens = token_checker(config.auth, metrics)
        middlewares.append(auth_middleware(config.auth, metrics, mirror.tokens))
    app = web.Application(middlewares=middlewares, handler_args={"max_field_size": 8190})
    app[MIRROR] = mirror
    search.setup(app, config, default.upstream)  # before routes: its catch-all would take /api/v1/crates
    app.add_routes(routes.routes)
    app.add_routes(status_page.routes)
    app.cleanup_ctx.append(_lifecycle)
    toolchains.install(app)  # /toolchains/: rustup's dist server (toolchains.upstream)
    install_audit(app)  # after _lifecycle: started after the stores, closed before them
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    mirror = app[MIRROR]
    for registry in mirror.registries.values():
        await registry.start(offline=mirror.config.offline)
    # Each registry's upstream health, shared with the other replicas (a no-op without Redis).
    health = [
        asyncio.create_task(registry.coordination.share_health(registry.upstream.health))
        for registry in mirror.registries.values()
    ]
    try:
        for registry in mirror.registries.values():
            # What a crash left half done (a few rows, never a walk of the cache): totals exact again.
            settled = await asyncio.to_thread(registry.store.settle)
            if settled:
                log.info("settled %d crate commits or evictions left by an earlier run", settled)
            registry.record_usage(registry.store.usage())
    except (OSError, sqlite3.Error) as exc:  # a full disk: keep serving, /readyz says why
        mirror.disk_trouble.report(f"could not settle the cache at start-up: {exc}")
    await mirror.policy.start()
    readiness = asyncio.create_task(mirror.readiness.run())
    yield
    readiness.cancel()
    await mirror.policy.close()
    mirror.unknown_names.close()
    for task in health:
        task.cancel()
    await asyncio.gather(*health, return_exceptions=True)
    for registry in mirror.registries.values():
        await registry.close()
