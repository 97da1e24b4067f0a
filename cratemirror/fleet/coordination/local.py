"""Coordination within one host: the cache dir's flocks, nothing shared beyond it."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cratemirror.fleet.coordination.health import UpstreamHealth
    from cratemirror.fleet.storage.disk import Store


class LocalCoordination:
    def __init__(self, store: Store) -> None:
        self.store = store

    def lock(self, key: str) -> AbstractAsyncContextManager[None]:
        return self.store.lock(key)

    async def missing_since(self, key: str) -> float | None:
        return None  # the store's own negative entries are all there is

    async def remember_missing(self, key: str, checked_at: float, ttl: float) -> None:
        return None

    async def share_health(self, health: UpstreamHealth) -> None:
        return None  # one replica: its own view is all there is

    async def problem(self) -> str | None:
        return None

    async def take_token(self, key: str, burst: int, per_second: float) -> float | None:
        return None  # no fleet-wide buckets: the host's budget file is all there is

    async def give_token(self, key: str, burst: int) -> bool:
        return False

    async def claim_once(self, key: str, seconds: float) -> tuple[bool, float] | None:
        return None

    async def close(self) -> None:
        return None
