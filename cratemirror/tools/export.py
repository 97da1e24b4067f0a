"""`cratemirror export BUNDLE [--since DURATION | --lockfile LOCKFILE ...]`: the working set in one tar.

Every crate is re-hashed on the way out and checked against its cached index line, so a bundle never
carries bytes the cache itself would not serve. Safe while the server runs (read-only on the cache).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cratemirror import __version__
from cratemirror.config import ConfigError, parse_duration
from cratemirror.index import UPSTREAM_CONFIG_KEY, MalformedIndexLine, find_version
from cratemirror.names import CrateName, InvalidRequest
from cratemirror.policy.bundle import MANIFEST_KEY, export_advisory_db
from cratemirror.store import CrateMeta, IndexEntry, Store, sha256_stream
from cratemirror.tools.bundle import MANIFEST, crate_member, index_member, manifest_document, registry_member
from cratemirror.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Progress,
    cached_crate_metas,
    error,
    extra_stores,
    format_size,
    open_existing_store,
    plural,
    tool_config,
)
from cratemirror.tools.lockfile import accepted_sources, read_lockfiles, registry_sources


@dataclass
class Selection:
    metas: list[CrateMeta] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # wanted but not cached


@dataclass
class ExportResult:
    crates: list[dict[str, Any]] = field(default_factory=list)
    index_files: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    crate_bytes: int = 0
    advisories: int | None = None  # advisory files carried (--advisory-db)


def last_activity(store: Store, meta: CrateMeta) -> float:
    """When a crate was last fetched or served (serving refreshes the file's mtime, at most hourly)."""
    try:
        return max(meta.fetched_at, store.crate_path(meta.name, meta.version).stat().st_mtime)
    except FileNotFoundError:
        return meta.fetched_at


def select(
    store: Store,
    metas: list[CrateMeta],
    since: float | None,
    lockfiles: Sequence[str] | None,
    upstream: str,
    accepted: Sequence[str] | None = None,
) -> Selection:
    """`accepted`: the lockfile source ids of this registry (default: crates.io's and `upstream`)."""
    if since is not None:
        cutoff = time.time() - since
        return Selection([meta for meta in metas if last_activity(store, meta) >= cutoff])
    if not lockfiles:
        return Selection(metas)
    by_key = {(meta.name.lower(), meta.version): meta for meta in metas}
    selection = Selection()
    locked = read_lockfiles(lockfiles, accepted or accepted_sources([upstream]))
    selection.problems.extend(locked.conflicts)
    for crate in locked.crates:
        meta = by_key.get((crate.name.lower(), crate.version))
        if meta is None:
            selection.problems.append(f"MISSING {crate.name} {crate.version}: not in the cache")
        elif crate.checksum is not None and crate.checksum != meta.sha256:
            selection.problems.append(
                f"MISMATCH {crate.name} {crate.version}: the lockfile's checksum {crate.checksum} "
                f"differs from the cached crate's {meta.sha256}"
            )
        else:
            selection.metas.append(meta)
    return selection


def _add_bytes(tar: tarfile.TarFile, name: str, body: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(body))


def _add_crate(
    tar: tarfile.TarFile, store: Store, meta: CrateMeta, index: IndexEntry | None, result: ExportResult
) -> None:
    label = f"{meta.name} {meta.version}"
    try:
        record = find_version(index.body, CrateName(meta.name), meta.version) if index is not None else None
    except (MalformedIndexLine, InvalidRequest) as exc:
        result.problems.append(f"SKIPPED {label}: {exc}")
        return
    if record is None:
        result.problems.append(f"SKIPPED {label}: its index file is not cached (or lacks this version)")
        return
    if record.cksum != meta.sha256:
        result.problems.append(f"SKIPPED {label}: the cached index cksum differs from the stored checksum")
        return
    try:
        # Opened once: an eviction meanwhile cannot change what this descriptor reads.
        with open(store.crate_path(meta.name, meta.version), "rb") as handle:
            digest, size = sha256_stream(handle)
            if digest != meta.sha256:
                result.problems.append(
                    f"SKIPPED {label}: the file is corrupt (run `cratemirror verify --fix`)"
                )
                return
            handle.seek(0)
            info = tarfile.TarInfo(crate_member(meta.name, meta.version))
            info.size = size
            info.mtime = int(os.fstat(handle.fileno()).st_mtime)
            info.mode = 0o644
            tar.addfile(info, handle)
    except FileNotFoundError:
        result.problems.append(f"SKIPPED {label}: the file is not in the cache (evicted?)")
        return
    result.crates.append(
        {
            "name": meta.name,
            "version": meta.version,
            "sha256": digest,
            "size": size,
            "fetched_at": meta.fetched_at,
        }
    )
    result.crate_bytes += size


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


def _cached_index(store: Store, lower: str) -> IndexEntry | None:
    entry = store.get_index(lower)
    return entry if entry is not None and entry.status == 200 else None


def _write_members(
    tar: tarfile.TarFile, store: Store, metas: list[CrateMeta], advisory_db: Path | None
) -> ExportResult:
    """Crates, then the index files of the crates that made it, then the manifest (it lists both)."""
    result = ExportResult()
    indexes: dict[str, IndexEntry | None] = {}
    included: dict[str, str] = {}  # lowercased name -> name, for crates that went in
    progress = Progress("export", len(metas))
    for meta in sorted(metas, key=lambda item: (item.name.lower(), item.version)):
        lower = meta.name.lower()
        if lower not in indexes:
            indexes[lower] = _cached_index(store, lower)
        before = len(result.problems)
        _add_crate(tar, store, meta, indexes[lower], result)
        for problem in result.problems[before:]:
            progress.note(problem)
        if len(result.problems) == before:
            included[lower] = meta.name
        progress.step(f"{meta.name} {meta.version}")
    progress.finish()
    for lower, name in included.items():
        entry = indexes[lower]
        assert entry is not None  # a crate goes in only with its index line
        _add_bytes(tar, index_member(name), entry.body, time.time())
        result.index_files.append(_index_record(name, entry))
    config = store.get_json(UPSTREAM_CONFIG_KEY)
    manifest = manifest_document(
        datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        f"cratemirror {__version__}",
        config if isinstance(config, dict) else None,
        result.crates,
        result.index_files,
    )
    if advisory_db is not None:
        manifest[MANIFEST_KEY] = export_advisory_db(tar, advisory_db)
        result.advisories = len(manifest[MANIFEST_KEY]["files"])
    _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=1).encode(), time.time())
    return result


def write_bundle(
    store: Store,
    metas: list[CrateMeta],
    target: Path,
    advisory_db: Path | None = None,
    nested: Sequence[tuple[str, Path]] = (),
) -> ExportResult:
    """Write the tar next to `target`, then rename it into place: no half-written bundle is left.
    `nested`: (registry name, bundle file) of extra registries, carried as registries/<name>.tar."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open(partial, "wb") as out:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, path in nested:
                    info = tarfile.TarInfo(registry_member(name))
                    info.size, info.mtime, info.mode = path.stat().st_size, int(time.time()), 0o644
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
                result = _write_members(tar, store, metas, advisory_db)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return result


def run_export(args: argparse.Namespace) -> int:
    since: float | None = None
    if args.since is not None:
        try:
            since = parse_duration(args.since)
        except ValueError:
            raise ConfigError(f"--since: expected a duration like 30d, got {args.since!r}") from None
    config = tool_config(args)
    advisory_db = config.policy.advisory_db if args.advisory_db else None
    if args.advisory_db and (advisory_db is None or not (advisory_db / "crates").is_dir()):
        raise ConfigError(
            f"{config.source}: policy.advisory_db: expected an advisory-db checkout for --advisory-db, "
            f"got {str(advisory_db) if advisory_db else None!r}"
        )
    store = open_existing_store(config)
    target = Path(args.bundle)
    extras = extra_stores(config)
    nested: list[tuple[str, Path]] = []
    problems = 0
    try:
        # Each extra registry's working set as a bundle of its own, carried inside this one.
        for name, extra in extras:
            accepted = registry_sources(config.registries[name].index_url)
            chosen = select(extra, cached_crate_metas(extra), since, args.lockfile, "", accepted)
            for problem in chosen.problems:
                print(f"export [{name}]: {problem}", file=sys.stderr)
            path = target.with_name(f".{target.name}.{name}.{os.getpid()}.part")
            try:
                written = write_bundle(extra, chosen.metas, path)
            except OSError as exc:
                return error(f"cannot write bundle {target}: {exc.strerror or exc}")
            nested.append((name, path))
            problems += len(chosen.problems) + len(written.problems)
            print(
                f"export [{name}]: {plural(len(written.crates), 'crate')} "
                f"({format_size(written.crate_bytes)}) and {plural(len(written.index_files), 'index file')}"
            )
        selection = select(store, cached_crate_metas(store), since, args.lockfile, config.upstream.index_url)
        for problem in selection.problems:
            print(f"export: {problem}", file=sys.stderr)
        try:
            result = write_bundle(store, selection.metas, target, advisory_db, nested)
        except OSError as exc:
            return error(f"cannot write bundle {target}: {exc.strerror or exc}")
    finally:
        store.close()
        for _, extra in extras:
            extra.close()
        for _, path in nested:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    problems += len(selection.problems) + len(result.problems)
    print(
        f"export: {plural(len(result.crates), 'crate')} ({format_size(result.crate_bytes)}) and "
        f"{plural(len(result.index_files), 'index file')}"
        + (
            f" and {plural(result.advisories, 'advisory', 'advisories')}"
            if result.advisories is not None
            else ""
        )
        + f" -> {target}"
        + (f"; {plural(problems, 'crate')} left out (see above)" if problems else "")
    )
    return EXIT_FAILURE if problems else EXIT_OK
