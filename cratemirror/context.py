"""The services one worker process runs, reachable from handlers through a typed app key."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from cratemirror.config import Config
from cratemirror.crates import CrateService
from cratemirror.index import IndexService
from cratemirror.metrics import Metrics
from cratemirror.store import DiskTrouble, Store
from cratemirror.upstream import Upstream

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
    started_at: float = field(default_factory=time.time)
    # Per worker process: cheap to keep, and each worker's own view is enough to spot what is missing.
    recent_misses: deque[RecentMiss] = field(default_factory=lambda: deque(maxlen=RECENT_MISSES))

    def record_usage(self, usage: dict[str, tuple[int, int]]) -> None:
        for kind, (size, entries) in usage.items():
            self.metrics.cache_size.labels(kind).set(size)
            self.metrics.cache_entries.labels(kind).set(entries)

    async def refresh_usage(self) -> None:
        """Set the cache gauges from the store's shared running totals, exact at every scrape.

        Every worker sees the same disk, so whichever worker answers the scrape writes the newest value
        (the gauges are `livemostrecent`). A few indexed SQLite reads, never a walk over the files."""
        self.record_usage(await asyncio.to_thread(self._current_usage))

    def _current_usage(self) -> dict[str, tuple[int, int]]:
        meta = self.store.meta
        return {
            "crate": (self.store.crate_bytes(), _count_keys(meta, "crate:")),
            "index": (int(meta.volume()), _count_keys(meta, "index:")),
        }


def _count_keys(cache: Any, prefix: str) -> int:
    """Keys of a diskcache.Cache starting with `prefix` (an ASCII prefix ending in ':').

    diskcache has no prefix count and iterating its keys takes seconds on a big cache; this is a range
    scan of its (key, raw) index, a few milliseconds for 100k keys. Belongs in Store (see store.py)."""
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    rows = cache._sql(
        "SELECT COUNT(*) FROM Cache WHERE key >= ? AND key < ? AND (expire_time IS NULL OR expire_time > ?)",
        (prefix, upper, time.time()),
    ).fetchall()
    return int(rows[0][0])


MIRROR = web.AppKey("mirror", Mirror)
