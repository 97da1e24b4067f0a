"""`cratemirror prune [--max-size SIZE] [--dry-run]` with storage.backend s3: delete the oldest crate
objects until the bucket's crates take at most SIZE.

Recency is the object's LastModified, i.e. when a replica first stored the crate: S3 keeps no access
time, and replicas serve from their own hot copy (or a presigned URL) without writing to the object, so
"least recently stored" is the recency the bucket has. A pruned crate that is still wanted is fetched
from upstream and stored again on its next request. Index files are small and stay.

The listing is held as (key, size, time) per object to sort it: about 100 bytes per crate.
"""

from __future__ import annotations

import asyncio
import time

from cratemirror.config.schema import Config
from cratemirror.fleet.storage import SharedStorage, StoredCrate
from cratemirror.tools.common import EXIT_OK, format_size, plural, run_on_bucket, shared_storages

JOBS = 8  # deletes at once
PRINT_LIMIT = 100  # crates named one per line; the rest are counted


async def oldest_over(shared: SharedStorage, max_size: int) -> tuple[list[StoredCrate], int]:
    """The crates to delete, oldest first, and the bytes stored before."""
    stored = [item async for item in shared.iter_crates()]
    total = sum(item.size for item in stored)
    stored.sort(key=lambda item: (item.stored_at, item.key.crate.name, item.key.version))
    chosen: list[StoredCrate] = []
    left = total
    for item in stored:
        if left <= max_size:
            break
        chosen.append(item)
        left -= item.size
    return chosen, total


async def _delete(shared: SharedStorage, chosen: list[StoredCrate]) -> None:
    for start in range(0, len(chosen), JOBS):
        await asyncio.gather(*(shared.delete_crate(item.key) for item in chosen[start : start + JOBS]))


async def _prune_one(shared: SharedStorage, verb: str, max_size: int, dry_run: bool) -> None:
    chosen, total = await oldest_over(shared, max_size)
    removed = sum(item.size for item in chosen)
    if not chosen:
        print(f"{verb}: nothing to remove: {format_size(total)} is within max {format_size(max_size)}")
        return
    if not dry_run:
        await _delete(shared, chosen)
    action = "would remove" if dry_run else "removed"
    for item in chosen[:PRINT_LIMIT]:
        stored = time.strftime("%Y-%m-%d %H:%M", time.localtime(item.stored_at))
        print(
            f"{verb}: {action} {item.key.crate.name} {item.key.version} "
            f"({format_size(item.size)}, stored {stored})"
        )
    if len(chosen) > PRINT_LIMIT:
        print(f"{verb}: ... and {len(chosen) - PRINT_LIMIT} more")
    what = f"{plural(len(chosen), 'crate')} ({format_size(removed)}) from the bucket"
    sizes = f"{format_size(total)} -> {format_size(total - removed)} (max {format_size(max_size)})"
    if dry_run:
        print(f"{verb}: dry run: would remove {what}: {sizes}; nothing was removed")
    else:
        print(f"{verb}: removed {what}: {sizes}")


async def _prune_all(config: Config, dry_run: bool) -> int:
    async with shared_storages(config) as storages:
        for name, shared in storages:
            await _prune_one(shared, f"prune [{name}]" if name else "prune", config.cache.max_size, dry_run)
    return EXIT_OK


def run_prune_bucket(config: Config, dry_run: bool) -> int:
    return run_on_bucket(_prune_all(config, dry_run))
