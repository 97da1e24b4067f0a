"""The services one worker process runs, reachable from handlers through a typed app key."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web

from cratemirror.config import Config
from cratemirror.crates import CrateService
from cratemirror.index import IndexService
from cratemirror.metrics import Metrics
from cratemirror.store import DiskTrouble, Store
from cratemirror.upstream import Upstream

USAGE_MAX_AGE = 30.0


@dataclass
class Mirror:
    config: Config
    metrics: Metrics
    store: Store
    upstream: Upstream
    index: IndexService
    crates: CrateService
    disk_trouble: DiskTrouble
    started_at: float = field(default_factory=time.time)
    usage_at: float = 0.0

    def record_usage(self, usage: dict[str, tuple[int, int]]) -> None:
        for kind, (size, entries) in usage.items():
            self.metrics.cache_size.labels(kind).set(size)
            self.metrics.cache_entries.labels(kind).set(entries)
        self.usage_at = time.time()

    async def refresh_usage(self, max_age: float = USAGE_MAX_AGE) -> None:
        """Cache size gauges, recounted from disk at most every `max_age` seconds."""
        if time.time() - self.usage_at >= max_age:
            self.usage_at = time.time()  # one recount at a time, even with concurrent scrapes
            self.record_usage(await asyncio.to_thread(self.store.usage))


MIRROR = web.AppKey("mirror", Mirror)
