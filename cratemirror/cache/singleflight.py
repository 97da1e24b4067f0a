"""In-process coalescing: concurrent callers for one key share one task.

Across worker processes the leader additionally holds `Store.lock(key)` while it fetches, and re-checks
the cache once it has the lock, so N processes still cause one upstream request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("cratemirror")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Task[T]] = {}

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Run `work` once per key at a time; returns (result, joined) where joined means another
        caller's task was already running. The task survives its callers being cancelled, so a fill
        started by a client that disconnects still completes and is stored."""
        task = self._inflight.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.ensure_future(work())
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task), joined

    def active(self, key: str) -> bool:
        return key in self._inflight

    def _finished(self, key: str, task: asyncio.Task[T]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here so an error nobody waited for (all callers gone) is not reported as lost.
            log.debug("fill for %s failed: %s", key, task.exception())

    async def cancel_all(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
