"""The services one worker process runs, reachable from handlers through a typed app key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from cratemirror.config import Config
from cratemirror.crates import CrateService
from cratemirror.index import IndexService
from cratemirror.metrics import Metrics
from cratemirror.store import Store
from cratemirror.upstream import Upstream


@dataclass
class Mirror:
    config: Config
    metrics: Metrics
    store: Store
    upstream: Upstream
    index: IndexService
    crates: CrateService
    started_at: float = field(default_factory=time.time)


MIRROR = web.AppKey("mirror", Mirror)
