"""`cratemirror export BUNDLE [--since DURATION | --lockfile LOCKFILE ...]`: the working set in one tar.

Written once against the storage seam (ArtifactStore): from the cache dir, or with storage.backend s3
from the bucket, into the same bundle format (tools/bundle.py). Every crate is streamed through SHA-256
into a spooled temp file and goes in only if it hashes to its stored index line's cksum, so a bundle
never carries bytes the mirror itself would not serve. --since selects by the store's recency (a cache
dir: last use; a bucket: when a replica stored the object). Each extra registry's working set travels
as a bundle of its own inside. Safe while the server runs (read-only on the store).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cratemirror import __version__
from cratemirror.cache.index import UPSTREAM_CONFIG_KEY, MalformedIndexLine, find_version
from cratemirror.config.schema import Config, ConfigError
from cratemirror.fleet.storage import ArtifactStore, CrateRecord, StoredCrate
from cratemirror.fleet.storage.disk import IndexEntry
from cratemirror.names import CrateName, InvalidRequest, parse_crate_version
from cratemirror.policy.bundle import MANIFEST_KEY, export_advisory_db
from cratemirror.tools.bundle import (
    MANIFEST,
    TOOLCHAINS_MEMBER,
    Records,
    add_bytes,
    bundle_file,
    crate_member,
    index_member,
    manifest_document,
    registry_member,
    write_manifest,
)
from cratemirror.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Backend,
    Opened,
    Progress,
    backend_of,
    duration_flag,
    error,
    format_size,
    open_stores,
    plural,
    run_tool,
    tool_config,
)
from cratemirror.tools.lockfile import accepted_sources, read_lockfiles, registry_sources

SPOOL_IN_MEMORY = 8 * 1024 * 1024  # a crate up to this size is spooled in memory, larger ones on disk


@dataclass
class Selection:
    crates: AsyncIterator[StoredCrate] = field(default_factory=lambda: _none())  # grouped by name
    problems: list[str] = field(default_factory=list)  # wanted but not stored


def _none() -> AsyncIterator[StoredCrate]:
    return _listed([])


async def _listed(items: list[StoredCrate]) -> AsyncIterator[StoredCrate]:
    for item in items:
        yield item


@dataclass
class ExportResult:
    crates: Records = field(default_factory=Records)
    index_files: Records = field(default_factory=Records)
    problems: list[str] = field(default_factory=list)
    crate_bytes: int = 0
    advisories: int | None = None  # advisory files carried (--advisory-db)

    def close(self) -> None:
        self.crates.close()
        self.index_files.close()


async def select(
    store: ArtifactStore,
    since: float | None,
    lockfiles: Sequence[str] | None,
    upstream: str,
    accepted: Sequence[str] | None = None,
) -> Selection:
    """What goes in: by last use or store (the listing, streamed), by lockfile (one lookup per locked
    crate), or everything (streamed). `accepted`: the lockfile source ids of this registry (default:
    crates.io's and `upstream`)."""
    if since is not None:
        cutoff = time.time() - since
        crates = store.list_crates()
        return Selection(item async for item in crates if max(item.recency, item.stored_at) >= cutoff)
    if not lockfiles:
        return Selection(store.list_crates())
    selection = Selection()
    locked = read_lockfiles(lockfiles, accepted or accepted_sources([upstream]))
    selection.problems.extend(locked.conflicts)
    chosen: list[StoredCrate] = []
    for crate in locked.crates:
        record = await _stored(store, crate.name, crate.version)
        if record is None:
            selection.problems.append(f"MISSING {crate.name} {crate.version}: not in the cache")
        elif crate.checksum is not None and crate.checksum != record.sha256:
            selection.problems.append(
                f"MISMATCH {crate.name} {crate.version}: the lockfile's checksum {crate.checksum} "
                f"differs from the cached crate's {record.sha256}"
            )
        else:
            chosen.append(StoredCrate(record.key, 0, record.stored_at))
    chosen.sort(key=lambda item: (item.key.crate.name, item.key.version))
    selection.crates = _listed(chosen)
    return selection


async def _stored(store: ArtifactStore, name: str, version: str) -> CrateRecord | None:
    """The lockfile spells the name as the registry does; the store's may differ only in case."""
    try:
        key = parse_crate_version(name, version)
    except InvalidRequest:
        return None
    record = await store.stat_crate(key)
    if record is not None and record.present and record.sha256 is not None:
        return record
    entry = await store.get_index(key.crate)
    if entry is None or entry.status != 200:
        return None
    try:
        line = find_version(entry.body, key.crate, version)
    except (MalformedIndexLine, InvalidRequest):
        return None
    if line is None or line.name == name:
        return None
    record = await store.stat_crate(parse_crate_version(line.name, version))
    return record if record is not None and record.present and record.sha256 is not None else None


async def _add_crate(
    tar: tarfile.TarFile,
    store: ArtifactStore,
    item: StoredCrate,
    index: IndexEntry | None,
    limit: int,
    backend: Backend,
) -> str | dict[str, Any]:
    """The manifest entry of the crate added, or why it was left out. Every crate is re-hashed on the
    way out and must hash to its stored index line's cksum."""
    key = item.key
    label = f"{key.crate.name} {key.version}"
    try:
        record = find_version(index.body, key.crate, key.version) if index is not None else None
    except (MalformedIndexLine, InvalidRequest) as exc:
        return f"SKIPPED {label}: {exc}"
    if record is None:
        return f"SKIPPED {label}: its index file is not {backend.stored_in} (or lacks this version)"
    with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY) as spool:
        copy = await store.read_crate(key, spool, limit)
        if copy is None:
            return f"SKIPPED {label}: the {backend.thing} is not {backend.stored_in} (deleted meanwhile?)"
        if copy.recorded is not None and copy.recorded != record.cksum:
            return f"SKIPPED {label}: the index cksum differs from the stored checksum"
        if copy.too_large or copy.sha256 != record.cksum:
            return f"SKIPPED {label}: the {backend.thing} is corrupt (run `cratemirror verify --fix`)"
        spool.seek(0)
        info = tarfile.TarInfo(crate_member(key.crate.name, key.version))
        info.size, info.mtime, info.mode = copy.size, int(item.stored_at), 0o644
        tar.addfile(info, spool)
        vars(tar)["members"].clear()  # tarfile keeps every header it wrote; nothing reads them
    return {
        "name": key.crate.name, "version": key.version, "sha256": copy.sha256, "size": copy.size,
        "fetched_at": item.stored_at,
    }  # fmt: skip


def _index_record(name: str, entry: IndexEntry) -> dict[str, Any]:
    return {
        "name": name,
        "sha256": hashlib.sha256(entry.body).hexdigest(),
        "size": len(entry.body),
        "last_modified": entry.last_modified,
        "checked_at": entry.checked_at,
        "upstream_etag": entry.upstream_etag,
        "upstream_last_modified": entry.upstream_last_modified,
    }


async def _write_members(
    tar: tarfile.TarFile,
    store: ArtifactStore,
    crates: AsyncIterator[StoredCrate],
    limit: int,
    backend: Backend,
    progress: Progress,
) -> ExportResult:
    """Crates, each crate's index file right after its last version. The crates come grouped by name,
    so only the current crate's index file is held."""
    result = ExportResult()
    crate: CrateName | None = None
    index: IndexEntry | None = None
    added = False  # a crate of `crate` went in: its index file follows
    async for item in crates:
        progress.total = max(progress.total, progress.done + 1)
        if crate is None or item.key.crate.name != crate.name:
            _add_index(tar, crate if added else None, index, result)
            crate, added = item.key.crate, False
            found = await store.get_index(crate)
            index = found if found is not None and found.status == 200 else None
        outcome = await _add_crate(tar, store, item, index, limit, backend)
        if isinstance(outcome, str):
            result.problems.append(outcome)
            progress.note(outcome)
        else:
            result.crates.append(outcome)
            result.crate_bytes += int(outcome["size"])
            added = True
        progress.step(f"{item.key.crate.name} {item.key.version}")
    _add_index(tar, crate if added else None, index, result)
    progress.finish()
    return result


def _add_index(
    tar: tarfile.TarFile, crate: CrateName | None, entry: IndexEntry | None, result: ExportResult
) -> None:
    if crate is None or entry is None:
        return
    add_bytes(tar, index_member(crate.name), entry.body, time.time())
    result.index_files.append(_index_record(crate.name, entry))


def finish_bundle(
    tar: tarfile.TarFile, result: ExportResult, config: object, advisory_db: Path | None
) -> None:
    """The advisory files (--advisory-db), then the manifest: last, as it lists everything before it."""
    head = manifest_document(
        datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        f"cratemirror {__version__}",
        config if isinstance(config, dict) else None,
        [],
        [],
    )
    if advisory_db is not None:
        head[MANIFEST_KEY] = export_advisory_db(tar, advisory_db)
        result.advisories = len(head[MANIFEST_KEY]["files"])
    with tempfile.TemporaryFile("w+b") as manifest:
        write_manifest(manifest, head, {"crates": result.crates, "index_files": result.index_files})
        info = tarfile.TarInfo(MANIFEST)
        info.size = manifest.tell()
        info.mtime = int(time.time())
        info.mode = 0o644
        manifest.seek(0)
        tar.addfile(info, manifest)


async def write_bundle(
    opened: Opened,
    crates: AsyncIterator[StoredCrate],
    target: Path,
    limit: int,
    backend: Backend,
    advisory_db: Path | None = None,
    nested: Sequence[tuple[str, Path]] = (),
    toolchains: Path | None = None,
) -> ExportResult:
    """Write the tar next to `target`, then rename it into place: no half-written bundle is left.
    `nested`: (registry name, bundle file) of extra registries, carried as registries/<name>.tar;
    `toolchains`: the toolchain files (tools/toolchain_bundle.py), carried as toolchains.tar.
    The manifest goes last, as it lists everything before it."""
    total = 0 if backend.bucket else (await opened.store.usage())[1]  # a bucket would list it all
    progress = Progress(f"export{opened.verb_suffix}", total)
    upstream_config = opened.local.get_json(UPSTREAM_CONFIG_KEY) if opened.local is not None else None
    with bundle_file(target) as tar:
        members = [(registry_member(name), path) for name, path in nested]
        if toolchains is not None:
            members.append((TOOLCHAINS_MEMBER, toolchains))
        for member, path in members:
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = path.stat().st_size, int(time.time()), 0o644
            with open(path, "rb") as handle:
                tar.addfile(info, handle)
        result = await _write_members(tar, opened.store, crates, limit, backend, progress)
        finish_bundle(tar, result, upstream_config, advisory_db)
    result.close()  # the spooled manifest entries; their counts stay
    return result


def run_export(args: argparse.Namespace) -> int:
    since = None if args.since is None else duration_flag("--since", args.since, "30d")
    config = tool_config(args)
    advisory_db = config.policy.advisory_db if args.advisory_db else None
    if args.advisory_db and (advisory_db is None or not (advisory_db / "crates").is_dir()):
        raise ConfigError(
            f"{config.source}: policy.advisory_db: expected an advisory-db checkout for --advisory-db, "
            f"got {str(advisory_db) if advisory_db else None!r}"
        )
    target = Path(args.bundle)
    toolchains = _export_toolchains(config, args.toolchain or [], target)
    try:
        code = run_tool(
            config, _export(config, target, since, args.lockfile, advisory_db, toolchains and toolchains[0])
        )
    finally:
        if toolchains is not None:
            toolchains[0].unlink(missing_ok=True)
    return max(code, EXIT_FAILURE if toolchains and toolchains[1] else EXIT_OK)


def _export_toolchains(config: Config, specs: Sequence[str], target: Path) -> tuple[Path, int] | None:
    """`--toolchain SPEC ...`: the cached toolchain files as the inner toolchains.tar; (file, problems)."""
    if not specs:
        return None
    from cratemirror.tools.toolchain_bundle import export_toolchains

    path = target.with_name(f".{target.name}.toolchains.{os.getpid()}.part")
    counts = export_toolchains(config, specs, path)
    for problem in counts.problems:
        print(f"export: {problem}", file=sys.stderr)
    print(f"export: {plural(counts.files, 'toolchain file')} ({format_size(counts.size)})")
    return path, len(counts.problems)


async def _export(
    config: Config,
    target: Path,
    since: float | None,
    lockfiles: Sequence[str] | None,
    advisory_db: Path | None,
    toolchains: Path | None = None,
) -> int:
    backend = backend_of(config)
    limit = backend.read_limit(config)
    nested: list[tuple[str, Path]] = []
    problems = 0
    async with open_stores(config) as opened:
        main, extras = opened[0], opened[1:]
        try:
            # Each extra registry's working set as a bundle of its own, carried inside this one.
            for extra in extras:
                accepted = registry_sources(config.registries[extra.name].index_url)
                chosen = await select(extra.store, since, lockfiles, "", accepted)
                verb = f"export{extra.verb_suffix}"
                for problem in chosen.problems:
                    print(f"{verb}: {problem}", file=sys.stderr)
                path = target.with_name(f".{target.name}.{extra.name}.{os.getpid()}.part")
                try:
                    written = await write_bundle(extra, chosen.crates, path, limit, backend)
                except OSError as exc:
                    return error(f"cannot write bundle {target}: {exc.strerror or exc}")
                nested.append((extra.name, path))
                problems += len(chosen.problems) + len(written.problems)
                print(
                    f"{verb}: {plural(written.crates.count, 'crate')} ({format_size(written.crate_bytes)}) "
                    f"and {plural(written.index_files.count, 'index file')}"
                )
            selection = await select(main.store, since, lockfiles, config.upstream.index_url)
            for problem in selection.problems:
                print(f"export: {problem}", file=sys.stderr)
            try:
                result = await write_bundle(
                    main, selection.crates, target, limit, backend, advisory_db, nested, toolchains
                )
            except OSError as exc:
                return error(f"cannot write bundle {target}: {exc.strerror or exc}")
        finally:
            for _, path in nested:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    problems += len(selection.problems) + len(result.problems)
    return _summary(result, target, problems)


def _summary(result: ExportResult, target: Path, problems: int) -> int:
    print(
        f"export: {plural(result.crates.count, 'crate')} ({format_size(result.crate_bytes)}) and "
        f"{plural(result.index_files.count, 'index file')}"
        + (
            f" and {plural(result.advisories, 'advisory', 'advisories')}"
            if result.advisories is not None
            else ""
        )
        + f" -> {target}"
        + (f"; {plural(problems, 'crate')} left out (see above)" if problems else "")
    )
    return EXIT_FAILURE if problems else EXIT_OK
