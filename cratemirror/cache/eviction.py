"""Least-recently-used eviction of cached crates (used by the server past cache.max_size, and by prune).

Recency is the ledger's `last_used` (set when stored, refreshed at most hourly when served), read oldest
first through an index: no walk over the files. The server evicts down to a low-water mark below
cache.max_size, so one eviction buys room for many fills instead of running again on the next one.

Work goes in batches, each one transaction to mark its rows EVICTING (they leave the totals), the
unlinks, and one transaction to drop the rows. No lock a fill waits on is held across a batch: each
crate's fill lock is only tried (a crate being filled is skipped) and held for its unlink. Removing a
file a client is reading is safe: the reader holds an open descriptor and gets the whole file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cratemirror.fleet.storage.disk import Store
from cratemirror.fleet.storage.ledger import LedgerRow

BATCH = 200  # rows per transaction: short enough that a fill's commit never waits long for the lock
BATCH_PAUSE = 0.005  # between batches: the worker's event loop gets the interpreter back
LOW_WATER = 0.9  # the server evicts down to this fraction of cache.max_size
MAX_LISTED = 10_000  # removed crates kept for the report (prune prints them); beyond that only counted


@dataclass(frozen=True, slots=True)
class CachedFile:
    name: str
    version: str
    size: int
    last_used: float


@dataclass
class EvictionReport:
    removed: list[CachedFile] = field(default_factory=list)  # the first MAX_LISTED
    removed_count: int = 0
    removed_bytes: int = 0
    skipped: int = 0  # being filled at that moment: left in place
    total_before: int = 0
    total_after: int = 0

    def add(self, row: LedgerRow) -> None:
        self.removed_count += 1
        self.removed_bytes += row.size
        self.total_after -= row.size
        if len(self.removed) < MAX_LISTED:
            self.removed.append(CachedFile(row.name, row.version, row.size, row.last_used))


def low_water(max_size: int) -> int:
    return int(max_size * LOW_WATER)


def evict_to(
    store: Store,
    target: int,
    *,
    dry_run: bool = False,
    batch: int = BATCH,
    on_batch: Callable[[int, int], None] | None = None,
) -> EvictionReport:
    """Remove least-recently-used crates until the stored total is at most `target` bytes.
    Call it under `store.eviction_lock()`. `on_batch(count, size)`: after each batch, what went."""
    total, entries = store.ledger.totals()
    report = EvictionReport(total_before=total, total_after=total)
    skip = 0  # rows left in place this run (being filled): they stay oldest, so read past them
    for _ in range(entries // batch + 2):  # bounded even if fills keep adding meanwhile
        if report.total_after <= target:
            break
        rows = store.ledger.oldest(batch, skip)
        if not rows:
            break
        wanted: list[LedgerRow] = []
        excess = report.total_after - target
        for row in rows:
            if excess <= 0:
                break
            wanted.append(row)
            excess -= row.size
        if dry_run:
            for row in wanted:
                report.add(row)
            skip += len(wanted)
            if on_batch is not None:
                on_batch(len(wanted), sum(row.size for row in wanted))
            continue
        gone, kept = store.evict_rows(wanted)
        for row in gone:
            report.add(row)
        report.skipped += len(kept)
        skip += len(kept)
        if on_batch is not None:
            on_batch(len(gone), sum(row.size for row in gone))
        # Fills commit meanwhile: follow the shared total, not only our own arithmetic.
        report.total_after = store.crate_bytes()
        time.sleep(BATCH_PAUSE)
    return report
