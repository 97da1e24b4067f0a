"""RedisCoordination: the local flock, then a Redis lock, so one replica of the fleet fills a key.

Lock: `SET cratemirror:lock:<key> <token> NX PX <ttl>`, the token a fencing number from `INCR`; the
holder renews the expiry while it works (only while the value is still its token) and deletes it only
if it is still its token, so a holder that stalled past the expiry can neither extend nor free someone
else's lock. A loser waits until the lock is gone, takes it, and then (in the fill) finds the object
in storage. Negative entries are plain keys with an expiry.

Redis unreachable: every call falls back to the local flock at once (per-replica coalescing), the
`cratemirror_coordination_up` gauge drops to 0 and /readyz says degraded; after RETRY_AFTER seconds
the next lock or the health loop (once a second) tries Redis again, so it recovers by itself. Every
call is bounded by coordination.timeout; /readyz never waits on Redis (problem() reads the state).

Upstream health is shared both ways: a replica whose own requests fail writes `upstream-down`, one
that sees the upstream answer again after that writes `upstream-up`; the others adopt the newer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.retry import Retry  # the asyncio client's (redis 8 converts a sync one, with a warning)
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from cratemirror.fleet.coordination.health import UpstreamHealth
from cratemirror.fleet.coordination.local import LocalCoordination
from cratemirror.metrics import Metrics

log = logging.getLogger("cratemirror.coordination")

PREFIX = "cratemirror:"
LOCK_TTL = 15.0  # seconds a lock outlives a holder that died without releasing it
RENEW_EVERY = LOCK_TTL / 3
RETRY_AFTER = 2.0  # seconds between attempts to reach a Redis that failed
IO_TIMEOUT = 1.0  # per Redis call (coordination.timeout): a hung Redis must not hold up cargo
WAIT_POLL_MAX = 0.1
WAIT_LIMIT = 900.0  # a loser never waits longer than this for another replica's fill
HEALTH_EVERY = 1.0  # seconds between looks at the fleet's view of the upstream
HEALTH_FRESH = 30.0  # seconds a replica's own failures count as news for the others
REASON_LIMIT = 200

# Extend / delete only while the lock still holds our fencing token.
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

# A client's token bucket (the unknown-name budget), refilled to Redis' own clock: one script per take,
# so replicas never race. Returns the tokens left, or minus the seconds until one is back (as text).
_TAKE = """
local burst, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('time')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local held = redis.call('hmget', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or burst
local at = tonumber(held[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
if tokens < 1 then return tostring(-(1 - tokens) / rate) end
redis.call('hset', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
redis.call('expire', KEYS[1], math.ceil(burst / rate) + 60)
return tostring(tokens - 1)
"""
_GIVE = """
local held = tonumber(redis.call('hget', KEYS[1], 'tokens'))
if held then redis.call('hset', KEYS[1], 'tokens', tostring(math.min(tonumber(ARGV[1]), held + 1))) end
return 1
"""

_FAILURES = (RedisError, OSError, TimeoutError)


def _heard_down(value: object) -> tuple[float, str] | None:
    """(when it failed, why) from another replica's note in Redis, checked like any other input."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    stamp, _, reason = text.partition(" ")
    try:
        failed_at = float(stamp)
    except ValueError:
        return None
    if not math.isfinite(failed_at):
        return None
    return failed_at, "".join(ch for ch in reason if ch.isprintable())[:REASON_LIMIT]


@dataclass
class _Held:
    key: str
    token: int
    renewal: asyncio.Task[None]


class RedisCoordination:
    def __init__(
        self,
        url: str,
        local: LocalCoordination,
        metrics: Metrics,
        namespace: str,
        timeout: float = IO_TIMEOUT,
    ) -> None:
        self.local = local
        self.prefix = f"{PREFIX}{namespace}:"
        self.metrics = metrics
        self.client = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)
        self._take = self.client.register_script(_TAKE)
        self._give = self.client.register_script(_GIVE)
        self._down_since: float | None = None
        self._down_reason = ""
        self._retry_at = 0.0

    # ---- health ---------------------------------------------------------------------------------

    def _usable(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._retry_at

    def _failed(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("redis unreachable, coalescing per replica until it is back: %s", exc)
        self._down_reason = str(exc) or type(exc).__name__
        self._retry_at = time.monotonic() + RETRY_AFTER
        self.metrics.coordination_up.set(0)

    def _worked(self) -> None:
        if self._down_since is not None:
            log.warning("redis is back after %.1fs: coordinating across replicas again",
                        time.monotonic() - self._down_since)  # fmt: skip
            self._down_since = None
            self.metrics.coordination_up.set(1)

    async def problem(self) -> str | None:
        if self._down_since is None:
            return None
        return f"coordination degraded: redis unreachable ({self._down_reason}); coalescing per replica"

    # ---- the lock -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        # The flock first: the worker processes of this replica queue locally, one asks Redis.
        async with self.local.lock(key):
            held = await self._acquire(self.prefix + "lock:" + key)
            try:
                yield
            finally:
                if held is not None:
                    await self._let_go(held)

    async def _acquire(self, name: str) -> _Held | None:
        """The Redis lock on `name`, or None when Redis cannot be used (the flock alone then)."""
        deadline = time.monotonic() + WAIT_LIMIT
        pause = 0.005
        while self._usable():
            try:
                token = int(await self.client.incr(self.prefix + "fence"))
                if await self.client.set(name, token, nx=True, px=int(LOCK_TTL * 1000)):
                    self._worked()
                    return _Held(name, token, asyncio.create_task(self._keep(name, token)))
                self._worked()
                # Another replica is filling: wait for it to finish (or its lock to expire).
                while await self.client.exists(name):
                    if time.monotonic() > deadline:
                        log.warning("gave up waiting for another replica's lock on %s", name)
                        return None
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, WAIT_POLL_MAX)
            except _FAILURES as exc:
                self._failed(exc)
        return None

    async def _keep(self, name: str, token: int) -> None:
        """Extend the lock while its holder works; stop if the token is no longer ours."""
        while True:
            await asyncio.sleep(RENEW_EVERY)
            try:
                if not await self._renew(keys=[name], args=[token, int(LOCK_TTL * 1000)]):
                    log.warning("lost the lock on %s (fencing token %d superseded)", name, token)
                    return
            except _FAILURES as exc:
                self._failed(exc)
                return

    async def _let_go(self, held: _Held) -> None:
        held.renewal.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held.renewal
        if not self._usable():
            return  # it expires by itself
        try:
            await self._release(keys=[held.key], args=[held.token])
        except _FAILURES as exc:
            self._failed(exc)

    # ---- shared upstream health ------------------------------------------------------------------

    async def share_health(self, health: UpstreamHealth) -> None:
        """Also the loop that notices a hung or returned Redis: it makes one call a second at least."""
        name = self.prefix + "upstream-down"
        up_name = self.prefix + "upstream-up"
        while True:
            await asyncio.sleep(HEALTH_EVERY)
            if not self._usable():
                continue
            try:
                if not health.is_up and not health.adopted:
                    # Our own failures, while they are news: the key expires soon after they stop.
                    if time.time() - health.last_failure_at < HEALTH_FRESH:
                        reason = (health.last_error or "failing")[:REASON_LIMIT]
                        value = f"{health.last_failure_at!r} {reason}"
                        await self.client.set(name, value, px=int(HEALTH_EVERY * 3 * 1000))
                    await self._take_recovery(health, up_name)
                elif health.is_up:
                    if time.time() - health.recovered_at < HEALTH_FRESH:
                        # We saw it answer again after it failed: the replicas still failing fast try now.
                        value = f"{health.recovered_at!r} answering again"
                        await self.client.set(up_name, value, px=int(HEALTH_FRESH * 1000))
                    if (said := await self.client.get(name)) is not None:
                        heard = _heard_down(said)
                        if heard is not None:
                            health.adopt_down(heard[1], heard[0])
                else:
                    await self._take_recovery(health, up_name)
                self._worked()
            except _FAILURES as exc:
                self._failed(exc)

    async def _take_recovery(self, health: UpstreamHealth, up_name: str) -> None:
        said = await self.client.get(up_name)
        heard = _heard_down(said) if said is not None else None
        if heard is not None:
            health.adopt_up(heard[0])

    # ---- shared facts ---------------------------------------------------------------------------

    async def missing_since(self, key: str) -> float | None:
        if not self._usable():
            return None
        try:
            value = await self.client.get(self.prefix + "missing:" + key)
        except _FAILURES as exc:
            self._failed(exc)
            return None
        self._worked()
        try:  # whatever is in Redis is checked like any other input
            checked_at = float(value) if value is not None else None
        except ValueError:
            return None
        return checked_at if checked_at is not None and 0 < checked_at <= time.time() else None

    async def remember_missing(self, key: str, checked_at: float, ttl: float) -> None:
        if not self._usable() or ttl <= 0:
            return
        try:
            await self.client.set(
                self.prefix + "missing:" + key, repr(checked_at), px=max(1, int(ttl * 1000))
            )
        except _FAILURES as exc:
            self._failed(exc)
            return
        self._worked()

    async def take_token(self, key: str, burst: int, per_second: float) -> float | None:
        """One token of a client's fleet-wide bucket (see cratemirror.cache.ratelimit); None while
        Redis is unreachable (the host's own buckets count meanwhile)."""
        if not self._usable():
            return None
        try:
            value = await self._take(keys=[self.prefix + "budget:" + key], args=[burst, per_second])
        except _FAILURES as exc:
            self._failed(exc)
            return None
        self._worked()
        try:  # checked like any other input
            left = float(value)
        except (TypeError, ValueError):
            return None
        return left if math.isfinite(left) else None

    async def give_token(self, key: str, burst: int) -> bool:
        if not self._usable():
            return False
        try:
            await self._give(keys=[self.prefix + "budget:" + key], args=[burst])
        except _FAILURES as exc:
            self._failed(exc)
            return False
        self._worked()
        return True

    async def claim_once(self, key: str, seconds: float) -> tuple[bool, float] | None:
        """Claim `key` for `seconds` fleet-wide: (claimed by us, when the standing claim was made)."""
        if not self._usable():
            return None
        name = self.prefix + "claim:" + key
        now = time.time()
        try:
            if await self.client.set(name, repr(now), nx=True, px=max(1, int(seconds * 1000))):
                self._worked()
                return True, now
            value = await self.client.get(name)
        except _FAILURES as exc:
            self._failed(exc)
            return None
        self._worked()
        try:  # checked like any other input
            at = float(value) if value is not None else now
        except ValueError:
            at = now
        return False, at if math.isfinite(at) and at <= now else now

    async def close(self) -> None:
        with contextlib.suppress(*_FAILURES):
            await self.client.aclose()
