"""The services one worker process runs, reachable from handlers through a typed app key."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

from cratemirror.cache.crates import CrateService
from cratemirror.cache.index import IndexService
from cratemirror.cache.ratelimit import UnknownNameBudget
from cratemirror.cache.registry import Registry
from cratemirror.config.schema import Config
from cratemirror.fleet.storage.disk import DiskTrouble, Store
from cratemirror.http.index_answers import IndexAnswers
from cratemirror.metrics import Metrics
from cratemirror.policy.service import PolicyService
from cratemirror.upstream.client import Upstream

RECENT_MISSES = 20


@dataclass(frozen=True, slots=True)
class RecentMiss:
    """A client request that had to go upstream (shown on the status page)."""

    at: float  # wall clock
    kind: str
    path: str
    status: int
    seconds: float
    upstream_seconds: float


@dataclass
class Mirror:
    config: Config
    metrics: Metrics
    store: Store
    upstream: Upstream
    index: IndexService
    crates: CrateService
    disk_trouble: DiskTrouble
    policy: PolicyService
    # Every registry bundle by name, crates-io (the fields above) included.
    registries: dict[str, Registry] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    unknown_names: UnknownNameBudget = field(default_factory=UnknownNameBudget)
    # Per worker process: cheap to keep, and each worker's own view is enough to spot what is missing.
    recent_misses: deque[RecentMiss] = field(default_factory=lambda: deque(maxlen=RECENT_MISSES))
    # Warm index hits' prepared answers (create_app sizes them by cache.memory_size).
    index_answers: IndexAnswers = field(default_factory=lambda: IndexAnswers(0))

    def record_usage(self, usage: dict[str, tuple[int, int]]) -> None:
        for kind, (size, entries) in usage.items():
            self.metrics.cache_size.labels(kind).set(size)
            self.metrics.cache_entries.labels(kind).set(entries)

    def extras(self) -> list[Registry]:
        return [registry for registry in self.registries.values() if not registry.is_default]

    async def refresh_usage(self) -> None:
        """Set the cache gauges from the store's shared running totals, exact at every scrape.

        Every worker sees the same disk, so whichever worker answers the scrape writes the newest value
        (the gauges are `livemostrecent`). A few indexed SQLite reads, never a walk over the files."""
        self.record_usage(await asyncio.to_thread(self.store.usage))
        for registry in self.extras():
            registry.record_usage(await asyncio.to_thread(registry.store.usage))


MIRROR = web.AppKey("mirror", Mirror)
