"""Least-recently-used eviction of cached crates (used by the server past cache.max_size, and by prune).

Recency is the file's mtime: set when stored and refreshed (at most hourly) when served. Removing a
file a client is reading is safe: the reader holds an open descriptor and gets the whole file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cratemirror.store import Store


@dataclass(frozen=True, slots=True)
class CachedFile:
    name: str
    version: str
    path: Path
    size: int
    last_used: float


@dataclass
class EvictionReport:
    removed: list[CachedFile] = field(default_factory=list)
    total_before: int = 0
    total_after: int = 0

    @property
    def removed_bytes(self) -> int:
        return sum(item.size for item in self.removed)


def scan_crates(store: Store) -> list[CachedFile]:
    found: list[CachedFile] = []
    for path in store.iter_crate_files():
        name = path.parent.name
        stem = path.name[: -len(".crate")]
        if not stem.startswith(f"{name}-"):
            continue  # not a file this mirror wrote
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue  # evicted by another process meanwhile
        found.append(CachedFile(name, stem[len(name) + 1 :], path, stat.st_size, stat.st_mtime))
    return found


def evict_to(store: Store, max_size: int, *, dry_run: bool = False) -> EvictionReport:
    """Remove least-recently-used crates until the total is at most `max_size` bytes."""
    files = scan_crates(store)
    total = sum(item.size for item in files)
    report = EvictionReport(total_before=total, total_after=total)
    for item in sorted(files, key=lambda cached: cached.last_used):
        if report.total_after <= max_size:
            break
        if not dry_run:
            store.remove_crate(item.name, item.version)
        report.removed.append(item)
        report.total_after -= item.size
    return report
