"""The services one worker process runs, reachable from handlers through a typed app key."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from cratemirror.auth.tokens import TokenChecker
from cratemirror.cache.ratelimit import UnknownNameBudget
from cratemirror.cache.readiness import ReadinessWatch
from cratemirror.cache.registry import Registry
from cratemirror.config.schema import Config
from cratemirror.fleet.storage.disk import DiskTrouble
from cratemirror.http.crate_answers import CrateAnswers, DownloadAsked
from cratemirror.http.index_answers import IndexAnswers
from cratemirror.metrics import Metrics, RequestTiming
from cratemirror.names import DEFAULT_REGISTRY
from cratemirror.policy.service import PolicyService

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
    disk_trouble: DiskTrouble
    policy: PolicyService
    # Every registry bundle by name, crates-io first.
    registries: dict[str, Registry]
    started_at: float = field(default_factory=time.time)
    unknown_names: UnknownNameBudget = field(default_factory=UnknownNameBudget)
    tokens: TokenChecker | None = None  # with auth.required: the tokens file as this worker reads it
    # Per worker process: cheap to keep, and each worker's own view is enough to spot what is missing.
    recent_misses: deque[RecentMiss] = field(default_factory=lambda: deque(maxlen=RECENT_MISSES))
    # Warm index hits' prepared answers (create_app sizes them by cache.memory_size), and small crates'.
    index_answers: IndexAnswers = field(default_factory=lambda: IndexAnswers(0))
    crate_answers: CrateAnswers = field(default_factory=lambda: CrateAnswers(0))
    # Told of every answered download request (what was asked, the status and headers): the audit trail.
    on_download: Callable[[web.BaseRequest, DownloadAsked, int, Mapping[str, str]], None] | None = None
    readiness: ReadinessWatch = field(init=False)  # what /readyz says, kept up to date in the background

    def __post_init__(self) -> None:
        self.readiness = ReadinessWatch(self.registries, self.disk_trouble, self.config.offline)

    @property
    def default(self) -> Registry:
        """crates.io's bundle: its store, upstream client, index and crate services."""
        return self.registries[DEFAULT_REGISTRY]

    def extras(self) -> list[Registry]:
        return [registry for registry in self.registries.values() if not registry.is_default]

    async def refresh_usage(self) -> None:
        """Set the cache gauges from the store's shared running totals, exact at every scrape.

        Every worker sees the same disk, so whichever worker answers the scrape writes the newest value
        (the gauges are `livemostrecent`). A few indexed SQLite reads, never a walk over the files."""
        for registry in self.registries.values():
            registry.record_usage(await asyncio.to_thread(registry.store.usage))


MIRROR = web.AppKey("mirror", Mirror)
# The request key under which the counted routes' hook (http/instrument.py) keeps the RequestTiming.
TIMING = web.RequestKey("cratemirror.timing", RequestTiming)
