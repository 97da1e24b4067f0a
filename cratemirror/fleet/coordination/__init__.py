"""Coordination: who fetches a key from upstream, and what every replica should know.

The fills (crates.py `_run_fill`, index.py `_refresh`) take `coordination.lock(key)`, re-check storage
once they hold it, and fetch only if the key is still missing. They never learn what the lock is:
`LocalCoordination` is the store's flock (one host, its worker processes); `RedisCoordination` wraps
it with a Redis lock so one replica of the fleet fetches and the others wait for the object to appear
in storage (Athens' `WithRedisLock` shape). One writer per key: nothing fans an upstream stream out.
"""

from __future__ import annotations

import importlib.util
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

from cratemirror.fleet.coordination.local import LocalCoordination
from cratemirror.names import DEFAULT_REGISTRY

if TYPE_CHECKING:
    from cratemirror.fleet.coordination.health import UpstreamHealth
    from cratemirror.fleet.storage.disk import Store
    from cratemirror.metrics import Metrics

__all__ = ["Coordination", "LocalCoordination", "make_coordination"]


class Coordination(Protocol):
    def lock(self, key: str) -> AbstractAsyncContextManager[None]:
        """Exclusive while held: the holder re-checks storage and fills the key if still missing."""
        ...

    async def missing_since(self, key: str) -> float | None:
        """When some replica learnt that upstream does not have `key` (wall clock), if it still counts."""
        ...

    async def remember_missing(self, key: str, checked_at: float, ttl: float) -> None:
        """Tell every replica that upstream did not have `key` at `checked_at`, for `ttl` seconds."""
        ...

    async def share_health(self, health: UpstreamHealth) -> None:
        """Runs until cancelled: tells the other replicas when our upstream is down, and takes their word."""
        ...

    async def problem(self) -> str | None:
        """None when coordination works as configured, else a one-line reason (/readyz: degraded).
        Answers from what the last calls and the background health loop saw: never waits on Redis."""
        ...

    async def take_token(self, key: str, burst: int, per_second: float) -> float | None:
        """One token of a fleet-wide bucket: tokens left, or -(seconds until one); None: not shared."""
        ...

    async def give_token(self, key: str, burst: int) -> bool:
        """Give a token back to a fleet-wide bucket; False: not shared."""
        ...

    async def claim_once(self, key: str, seconds: float) -> tuple[bool, float] | None:
        """Claim `key` fleet-wide for `seconds`: (claimed by this caller, when the standing claim was
        made); None: not shared."""
        ...

    async def close(self) -> None: ...


def make_coordination(
    redis_url: str | None,
    store: Store,
    metrics: Metrics,
    namespace: str = DEFAULT_REGISTRY,
    timeout: float = 1.0,
) -> Coordination:
    """`namespace`: the registry whose keys these are (registries never share a lock or a note);
    `timeout`: coordination.timeout, per Redis call."""
    local = LocalCoordination(store)
    metrics.coordination_up.set(1)
    if redis_url is None:
        return local
    # The config refuses a redis_url when the `fleet` extra is missing; this is for direct callers.
    if importlib.util.find_spec("redis") is None:
        raise RuntimeError("coordination.redis_url needs the extra cratemirror[fleet]")
    from cratemirror.fleet.coordination.with_redis import RedisCoordination

    return RedisCoordination(redis_url, local, metrics, namespace, timeout)
