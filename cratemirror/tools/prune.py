"""`cratemirror prune [--max-size SIZE] [--dry-run]`: evict least-recently-used crates down to a size.

The same eviction the server runs past cache.max_size (cratemirror.cache.eviction), under the same lock, so a
prune and a server eviction never race each other. Index files are small and stay.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from cratemirror.cache.eviction import EvictionReport, evict_to
from cratemirror.config.schema import ConfigError
from cratemirror.fleet.storage.disk import Store
from cratemirror.tools.common import (
    EXIT_OK,
    Progress,
    extra_stores,
    format_size,
    open_existing_store,
    plural,
    tool_config,
    uses_bucket,
)


async def _evict_locked(store: Store, max_size: int, dry_run: bool) -> EvictionReport:
    async with store.eviction_lock():  # the lock the server's eviction takes
        excess = max(0, store.crate_bytes() - max_size)
        progress = Progress("prune", 0)
        progress.bar.unit = "B"
        progress.bar.unit_scale = True
        progress.total = excess
        try:
            return await asyncio.to_thread(
                evict_to, store, max_size, dry_run=dry_run, on_batch=lambda _, size: progress.advance(size)
            )
        finally:
            progress.finish()


def run_prune(args: argparse.Namespace) -> int:
    # --max-size goes through the config loader: parse_size, and the usual one-line error (exit 2).
    config = tool_config(args, {"cache.max_size": args.max_size})
    if uses_bucket(config):
        if args.max_size is None:  # cache.max_size bounds each replica's hot copy, not the bucket
            raise ConfigError(
                f"{config.source}: --max-size: expected a size like 100GiB for the bucket "
                "(storage.backend s3 has no size bound of its own)"
            )
        from cratemirror.tools.prune_bucket import run_prune_bucket

        return run_prune_bucket(config, args.dry_run)
    # Each registry's crates are held to max_size on their own, as the server does.
    stores = [("", open_existing_store(config)), *extra_stores(config)]
    try:
        for name, store in stores:
            _prune_one(store, f"prune [{name}]" if name else "prune", config.cache.max_size, args.dry_run)
    finally:
        for _, store in stores:
            store.close()
    from cratemirror.tools.toolchain_upkeep import prune_toolchains

    prune_toolchains(
        config, None, args.dry_run
    )  # toolchain files: toolchains.max_size (--max-size is crates')
    return EXIT_OK


def _prune_one(store: Store, verb: str, max_size: int, dry_run: bool) -> None:
    report = asyncio.run(_evict_locked(store, max_size, dry_run))
    action = "would remove" if dry_run else "removed"
    removed = f"{plural(report.removed_count, 'crate')} ({format_size(report.removed_bytes)})"
    for item in report.removed:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(item.last_used))
        print(f"{verb}: {action} {item.name} {item.version} ({format_size(item.size)}, last used {used})")
    if report.removed_count > len(report.removed):
        print(f"{verb}: ... and {report.removed_count - len(report.removed)} more")
    sizes = (
        f"{format_size(report.total_before)} -> {format_size(report.total_after)} "
        f"(max {format_size(max_size)})"
    )
    if not report.removed_count:
        print(
            f"{verb}: nothing to remove: {format_size(report.total_before)} "
            f"is within max {format_size(max_size)}"
        )
    elif dry_run:
        print(f"{verb}: dry run: would remove {removed}: {sizes}; nothing was removed")
    else:
        print(f"{verb}: removed {removed}: {sizes}")
