"""A per-client budget for upstream lookups of names that turn out not to exist.

Every uncached name costs an upstream request, so a client asking for thousands of made-up names would
make the mirror hammer its upstream. Names that exist cost nothing here (a cold build looks up hundreds
of them); each upstream 404 takes a token, and a client with none left gets 429 with Retry-After for
names the mirror has not cached (cargo retries 429), until tokens come back at a steady rate.
"""

from __future__ import annotations

import math
import time

from cachetools import LRUCache

# A cold `cargo generate-lockfile` asks for every -/_ spelling of a missing name: 3 lookups each.
BURST = 120
PER_SECOND = 10.0
MAX_CLIENTS = 16384  # bounded memory however many addresses appear


class UnknownNameBudget:
    def __init__(self, burst: int = BURST, per_second: float = PER_SECOND) -> None:
        self.burst = burst
        self.per_second = per_second
        # client -> (tokens, monotonic time of that count)
        self._buckets: LRUCache[str, tuple[float, float]] = LRUCache(MAX_CLIENTS)

    def _tokens(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.per_second)

    def retry_after(self, client: str) -> int | None:
        """Seconds until this client may look up an unknown name again; None if it may now."""
        tokens = self._tokens(client, time.monotonic())
        if tokens >= 1:
            return None
        return max(1, math.ceil((1 - tokens) / self.per_second))

    def charge(self, client: str) -> None:
        now = time.monotonic()
        self._buckets[client] = (self._tokens(client, now) - 1, now)
