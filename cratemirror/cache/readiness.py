"""What /readyz says, kept up to date in the background: the route reads it and never waits.

Once a second the watch probes each registry's cache dir (a small write, in a thread); Redis and the
bucket are judged by their own background loops (coordination's health loop, the storage breaker's
probe), whose `problem()` reads state and does no I/O. The verdict:

- ready: everything works as configured;
- degraded (still 200: the replica answers): Redis or the bucket unreachable, or the cache disk
  failing (answers are passed through from upstream uncached);
- not ready (503): the replica cannot answer at all: its cache disk fails and it is offline, so it has
  neither a cache nor an upstream to answer from.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

from cratemirror.cache.registry import Registry
from cratemirror.fleet.storage.disk import DiskTrouble

WATCH_EVERY = 1.0  # seconds between two looks at the cache dirs


@dataclass(frozen=True, slots=True)
class Verdict:
    ready: bool  # False: 503, the replica cannot answer at all
    reason: str | None  # None: plain ready; else why it is degraded (or not ready)

    def text(self) -> str:
        if self.reason is None:
            return "ready\n"
        return f"{'degraded' if self.ready else 'not ready'}: {self.reason}\n"


class ReadinessWatch:
    def __init__(self, registries: Mapping[str, Registry], disk_trouble: DiskTrouble, offline: bool) -> None:
        self.registries = registries
        self.disk_trouble = disk_trouble
        self.offline = offline
        self.disk_problem: str | None = None

    async def run(self) -> None:
        """Until cancelled: the cache dirs' state, once a second."""
        while True:
            with contextlib.suppress(Exception):
                self.disk_problem = await asyncio.to_thread(self._disk)
            await asyncio.sleep(WATCH_EVERY)

    def _disk(self) -> str | None:
        for registry in self.registries.values():
            problem = registry.store.writable_problem()
            if problem:
                return problem
        return None

    async def verdict(self) -> Verdict:
        disk = self.disk_problem or self.disk_trouble.recent()
        if disk and self.offline:
            return Verdict(False, f"{disk}; offline, so nothing to answer from")
        reasons = [f"{disk}; answers are passed through uncached"] if disk else []
        for registry in self.registries.values():
            # Both read state their background loops keep: no I/O here.
            for problem in (await registry.coordination.problem(), await registry.shared.problem()):
                if problem and problem not in reasons:
                    reasons.append(problem)
        return Verdict(True, "; ".join(reasons) or None)
