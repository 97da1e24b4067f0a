"""A per-client budget for the upstream requests a client can cause for names the mirror does not hold.

Every uncached name costs an upstream request, so a client asking for thousands of made-up names would
make the mirror hammer its upstream. A request that may go upstream for a client (an index file, a
download or a refresh of a name without a fresh copy) takes a token *before* it does, so however many
lookups run at once, no more reach upstream than the client has tokens; the token is given back when
the name turns out to exist (a cold build looks up hundreds of them and pays nothing in the end). A
client with none left gets 429 with Retry-After (cargo retries 429) until tokens come back at a
steady rate.

The buckets are shared: by every worker process of a host through a small SQLite file in the cache
dir (one UPSERT per take, atomic across processes), and by every replica through Redis when
`coordination.redis_url` is set (one Lua script per take; the file takes over while Redis is down).
Clients are keyed by address; an IPv6 client by its /64, which one host usually holds whole.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

log = logging.getLogger("cratemirror.budget")

# A cold `cargo generate-lockfile` asks for every -/_ spelling of a missing name: 3 lookups each.
BURST = 120
PER_SECOND = 10.0
MAX_CLIENTS = 16384  # rows kept; beyond it the least recently charged are dropped
PRUNE_EVERY = 60.0  # seconds between sweeps of full buckets
FILE_NAME = "budgets.sqlite"
BUSY_TIMEOUT_MS = 2000


class SharedBuckets(Protocol):
    """Token buckets held outside this host (Redis); None from take/give when unreachable."""

    async def take_token(self, key: str, burst: int, per_second: float) -> float | None:
        """Take one token; the tokens left (>= 0) if taken, -(seconds until one is back) if none."""
        ...

    async def give_token(self, key: str, burst: int) -> bool: ...

    async def claim_once(self, key: str, seconds: float) -> tuple[bool, float] | None:
        """(whether this caller claimed `key`, when the standing claim was made), a claim standing
        `seconds`; None when unreachable."""
        ...


def client_key(client: str) -> str:
    """The bucket of an address: itself, or for IPv6 its /64 (a host has a whole one)."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client[:64]
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS budget (client TEXT PRIMARY KEY, tokens REAL NOT NULL, at REAL NOT NULL)"
)
# Refill to now, then take one token only if a whole one is there; RETURNING says whether it was taken.
_TAKE = (
    "INSERT INTO budget (client, tokens, at) VALUES (:client, :burst - 1, :now) "
    "ON CONFLICT (client) DO UPDATE SET "
    "tokens = min(:burst, tokens + max(0, :now - at) * :rate) - 1, at = :now "
    "WHERE min(:burst, tokens + max(0, :now - at) * :rate) >= 1 "
    "RETURNING tokens"
)
_GIVE = "UPDATE budget SET tokens = min(:burst, tokens + 1) WHERE client = :client"
_CLAIMS = "CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, at REAL NOT NULL)"
_CLAIM = (
    "INSERT INTO claims (key, at) VALUES (:key, :now) ON CONFLICT (key) DO UPDATE SET at = :now "
    # A claim from the future beyond its own length is a clock that jumped; one a moment ahead of our
    # `now` is another worker's, taken between our clock read and this statement.
    "WHERE at <= :now - :seconds OR at > :now + :seconds RETURNING at"
)


class _BudgetFile:
    """The host's buckets: one row per client in a SQLite file every worker opens."""

    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()  # one connection per process, used from one thread at a time
        self._db = sqlite3.connect(
            ":memory:" if path is None else str(path), timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None, check_same_thread=False,
        )  # fmt: skip
        with self._lock:
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=OFF")  # a lost budget after a crash costs nothing
            self._db.execute(_SCHEMA)
            self._db.execute(_CLAIMS)
        self._pruned_at = 0.0

    def take(self, key: str, burst: int, per_second: float) -> float:
        now = time.time()
        params = {"client": key, "burst": float(burst), "rate": per_second, "now": now}
        with self._lock:
            row = self._db.execute(_TAKE, params).fetchone()
            if row is not None:
                self._prune(now, burst, per_second)
                return float(row[0])
            have = self._db.execute("SELECT tokens, at FROM budget WHERE client = ?", (key,)).fetchone()
        tokens = float(have[0]) + max(0.0, now - float(have[1])) * per_second if have else 0.0
        return -max(1e-3, (1 - tokens) / per_second)

    def give(self, key: str, burst: int) -> None:
        with self._lock:
            self._db.execute(_GIVE, {"client": key, "burst": float(burst)})

    def claim(self, key: str, seconds: float) -> tuple[bool, float]:
        now = time.time()
        with self._lock:
            row = self._db.execute(_CLAIM, {"key": key, "now": now, "seconds": seconds}).fetchone()
            if row is not None:
                return True, now
            held = self._db.execute("SELECT at FROM claims WHERE key = ?", (key,)).fetchone()
        return False, float(held[0]) if held else now

    def _prune(self, now: float, burst: int, per_second: float) -> None:
        if now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        self._db.execute("DELETE FROM claims WHERE at < ?", (now - PRUNE_EVERY,))
        self._db.execute("DELETE FROM budget WHERE at < ?", (now - burst / per_second - 1,))
        self._db.execute(
            "DELETE FROM budget WHERE client IN "
            "(SELECT client FROM budget ORDER BY at DESC LIMIT -1 OFFSET ?)",
            (MAX_CLIENTS,),
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()


class UnknownNameBudget:
    def __init__(
        self,
        path: Path | None = None,
        shared: SharedBuckets | None = None,
        burst: int = BURST,
        per_second: float = PER_SECOND,
    ) -> None:
        """`path`: the host's budget file (None: this process alone); `shared`: the fleet's buckets."""
        self.burst = burst
        self.per_second = per_second
        self.shared = shared
        try:
            self._file = _BudgetFile(path)
        except sqlite3.Error as exc:  # a full or broken cache dir at start-up: this process's own buckets
            log.warning("unknown-name budget file %s unavailable, counting per process: %s", path, exc)
            self._file = _BudgetFile(None)

    async def take(self, client: str) -> int | None:
        """Charge one possible upstream request to `client`: None if it may go ahead, else the seconds
        (Retry-After) until it may."""
        key = client_key(client)
        left = None
        if self.shared is not None:
            left = await self.shared.take_token(key, self.burst, self.per_second)
        if left is None:
            try:
                left = self._file.take(key, self.burst, self.per_second)
            except sqlite3.Error as exc:  # a broken file never stops clients: this request goes ahead
                log.warning("unknown-name budget unavailable: %s", exc)
                return None
        return None if left >= 0 else max(1, math.ceil(-left))

    async def refund(self, client: str) -> None:
        """The name existed (or no upstream request was made): the token comes back."""
        key = client_key(client)
        if self.shared is not None and await self.shared.give_token(key, self.burst):
            return
        try:
            self._file.give(key, self.burst)
        except sqlite3.Error as exc:
            log.warning("unknown-name budget unavailable: %s", exc)

    async def claim_refresh(self, lower: str, seconds: float) -> float | None:
        """None: this caller is the one that may ask upstream about `lower` now; else when the refresh
        that stands (made less than `seconds` ago, by any worker or replica) was started."""
        key = "refresh:" + lower
        claim = None
        if self.shared is not None:
            claim = await self.shared.claim_once(key, seconds)
        if claim is None:
            try:
                claim = self._file.claim(key, seconds)
            except sqlite3.Error as exc:
                log.warning("refresh gate unavailable: %s", exc)
                return None
        claimed, at = claim
        return None if claimed else at

    def close(self) -> None:
        self._file.close()
