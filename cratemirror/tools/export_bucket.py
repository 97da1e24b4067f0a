"""`cratemirror export BUNDLE [--since DURATION]` with storage.backend s3: the working set read from the
bucket into the same bundle format as from a cache dir.

The crate objects are listed a page at a time (grouped by name, as the keys sort), each crate's index
file read from the bucket once, and each crate streamed through SHA-256 into a spooled temp file: it goes
into the bundle only if it hashes to its index line's cksum. --since selects by when a replica stored the
object (LastModified; the bucket keeps no access time).
"""

from __future__ import annotations

import asyncio
import tarfile
import tempfile
import time
from pathlib import Path

from cratemirror.cache.index import UPSTREAM_CONFIG_KEY, MalformedIndexLine, find_version
from cratemirror.config.schema import Config
from cratemirror.fleet.storage import SharedStorage, StoredCrate
from cratemirror.fleet.storage.disk import IndexEntry, Store
from cratemirror.names import CrateName, InvalidRequest
from cratemirror.tools.bundle import crate_member, index_member
from cratemirror.tools.common import Progress
from cratemirror.tools.export import ExportResult, _add_bytes, _index_record, bundle_file, finish_bundle

SPOOL_IN_MEMORY = 8 * 1024 * 1024  # a crate up to this size is spooled in memory, larger ones on disk


async def _add_crate(
    tar: tarfile.TarFile, shared: SharedStorage, item: StoredCrate, index: IndexEntry | None, limit: int
) -> str | dict[str, object]:
    """The manifest entry of the crate added, or why it was left out."""
    key = item.key
    label = f"{key.crate.name} {key.version}"
    try:
        record = find_version(index.body, key.crate, key.version) if index is not None else None
    except (MalformedIndexLine, InvalidRequest) as exc:
        return f"SKIPPED {label}: {exc}"
    if record is None:
        return f"SKIPPED {label}: its index file is not in the bucket (or lacks this version)"
    with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY) as spool:
        copy = await shared.read_crate(key, spool, limit)
        if copy is None:
            return f"SKIPPED {label}: deleted from the bucket meanwhile"
        if copy.too_large or copy.sha256 != record.cksum:
            return f"SKIPPED {label}: the object is corrupt (run `cratemirror verify --fix`)"
        spool.seek(0)
        info = tarfile.TarInfo(crate_member(key.crate.name, key.version))
        info.size, info.mtime, info.mode = copy.size, int(item.stored_at), 0o644
        tar.addfile(info, spool)
        vars(tar)["members"].clear()  # tarfile keeps every header it wrote; nothing reads them
    return {
        "name": key.crate.name, "version": key.version, "sha256": copy.sha256, "size": copy.size,
        "fetched_at": item.stored_at,
    }  # fmt: skip


def _add_index(
    tar: tarfile.TarFile, crate: CrateName | None, entry: IndexEntry | None, result: ExportResult
) -> None:
    if crate is None or entry is None:
        return
    _add_bytes(tar, index_member(crate.name), entry.body, time.time())
    result.index_files.append(_index_record(crate.name, entry))


async def _write(
    tar: tarfile.TarFile, shared: SharedStorage, cutoff: float | None, limit: int, progress: Progress
) -> ExportResult:
    result = ExportResult()
    crate: CrateName | None = None
    index: IndexEntry | None = None
    added = False  # a crate of `crate` went in: its index file follows
    async for item in shared.iter_crates():
        if cutoff is not None and item.stored_at < cutoff:
            continue
        progress.total = progress.total + 1
        if crate is None or item.key.crate.name != crate.name:
            _add_index(tar, crate if added else None, index, result)
            crate, added = item.key.crate, False
            found = await shared.get_index(crate)
            index = found if found is not None and found.status == 200 else None
        outcome = await _add_crate(tar, shared, item, index, limit)
        if isinstance(outcome, str):
            result.problems.append(outcome)
            progress.note(outcome)
        else:
            result.crates.append(outcome)
            result.crate_bytes += item.size
            added = True
        progress.step(f"{item.key.crate.name} {item.key.version}")
    _add_index(tar, crate if added else None, index, result)
    progress.finish()
    return result


async def _export(
    config: Config, target: Path, cutoff: float | None, advisory_db: Path | None
) -> ExportResult:
    from cratemirror.tools.common import shared_storages

    # Where tarballs live upstream: what a replica's cache dir learnt, if this host has one.
    upstream_config = None
    if (config.cache.dir / "meta").is_dir():
        local = Store(config.cache.dir)
        try:
            upstream_config = local.get_json(UPSTREAM_CONFIG_KEY)
        finally:
            local.close()
    async with shared_storages(config) as storages:
        shared = storages[0][1]  # crates.io's; extra registries are not carried from a bucket yet
        with bundle_file(target) as tar:
            result = await _write(tar, shared, cutoff, config.upstream.max_crate_size, Progress("export", 0))
            finish_bundle(tar, result, upstream_config, advisory_db)
    result.close()
    return result


def export_from_bucket(
    config: Config, target: Path, since: float | None, advisory_db: Path | None
) -> ExportResult:
    cutoff = time.time() - since if since is not None else None
    return asyncio.run(_export(config, target, cutoff, advisory_db))
