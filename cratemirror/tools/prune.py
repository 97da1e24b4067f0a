"""`cratemirror prune [--max-size SIZE] [--dry-run]`: delete least-recently-used crates down to a size.

Written once against the storage seam (ArtifactStore). Recency is the store's: in a cache dir the
ledger's last use (the same order the server's eviction follows, under the same lock, so a prune and a
server eviction never race, and a crate being filled is left in place); in the bucket (storage.backend
s3) the object's LastModified, i.e. when a replica first stored it: S3 keeps no access time. Each
registry's crates are held to the size on their own, as the server does. A pruned crate that is still
wanted is fetched from upstream again on its next request. Index files are small and stay.
"""

from __future__ import annotations

import argparse
import time

from cratemirror.config.schema import Config, ConfigError
from cratemirror.fleet.storage import ArtifactStore, StoredCrate
from cratemirror.tools.common import (
    EXIT_OK,
    Backend,
    Progress,
    backend_of,
    format_size,
    open_stores,
    plural,
    run_tool,
    tool_config,
)

BATCH = 200  # crates deleted per call (a cache dir: one ledger transaction each)
PRINT_LIMIT = 100  # crates named one per line; the rest are counted


async def oldest_over(store: ArtifactStore, max_size: int) -> tuple[list[StoredCrate], int]:
    """The crates to delete, least recently used first, and the bytes stored before."""
    total = (await store.usage())[0]
    chosen: list[StoredCrate] = []
    left = total
    if left > max_size:
        async for item in store.list_crates(oldest_first=True):
            chosen.append(item)
            left -= item.size
            if left <= max_size:
                break
    return chosen, total


async def prune(
    store: ArtifactStore, max_size: int, dry_run: bool, verb: str
) -> tuple[list[StoredCrate], int]:
    """(the crates removed, or that would be, and the bytes stored before), under the store's prune lock."""
    async with store.pruning():
        chosen, total = await oldest_over(store, max_size)
        if dry_run or not chosen:
            return chosen, total
        progress = Progress(verb, 0)
        progress.bar.unit, progress.bar.unit_scale = "B", True
        progress.total = sum(item.size for item in chosen)
        removed: list[StoredCrate] = []
        try:
            for start in range(0, len(chosen), BATCH):
                batch = chosen[start : start + BATCH]
                gone = set(await store.delete_crates([item.key for item in batch]))
                removed += [item for item in batch if item.key in gone]
                progress.advance(sum(item.size for item in batch if item.key in gone))
        finally:
            progress.finish()
        return removed, total


def run_prune(args: argparse.Namespace) -> int:
    # --max-size goes through the config loader: parse_size, and the usual one-line error (exit 2).
    config = tool_config(args, {"cache.max_size": args.max_size})
    backend = backend_of(config)
    if not backend.bounded and args.max_size is None:  # cache.max_size bounds each replica's hot copy
        raise ConfigError(
            f"{config.source}: --max-size: expected a size like 100GiB for the bucket "
            "(storage.backend s3 has no size bound of its own)"
        )
    code = run_tool(config, _prune_all(config, backend, args.dry_run))
    from cratemirror.tools.toolchain_upkeep import prune_toolchains

    prune_toolchains(config, None, args.dry_run)  # bounded by toolchains.max_size, not --max-size
    return code


async def _prune_all(config: Config, backend: Backend, dry_run: bool) -> int:
    async with open_stores(config) as opened:
        for one in opened:
            verb = f"prune{one.verb_suffix}"
            removed, total = await prune(one.store, config.cache.max_size, dry_run, verb)
            _report(verb, backend, removed, total, config.cache.max_size, dry_run)
    return EXIT_OK


def _report(
    verb: str, backend: Backend, removed: list[StoredCrate], total: int, max_size: int, dry_run: bool
) -> None:
    if not removed:
        print(f"{verb}: nothing to remove: {format_size(total)} is within max {format_size(max_size)}")
        return
    action = "would remove" if dry_run else "removed"
    for item in removed[:PRINT_LIMIT]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(item.recency))
        used = "last used" if item.used_at is not None else "stored"
        print(
            f"{verb}: {action} {item.key.crate.name} {item.key.version} "
            f"({format_size(item.size)}, {used} {when})"
        )
    if len(removed) > PRINT_LIMIT:
        print(f"{verb}: ... and {len(removed) - PRINT_LIMIT} more")
    size = sum(item.size for item in removed)
    what = f"{plural(len(removed), 'crate')} ({format_size(size)}){backend.from_place}"
    sizes = f"{format_size(total)} -> {format_size(total - size)} (max {format_size(max_size)})"
    if dry_run:
        print(f"{verb}: dry run: would remove {what}: {sizes}; nothing was removed")
    else:
        print(f"{verb}: removed {what}: {sizes}")
