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
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cratemirror import __version__
from cratemirror.cache.index import UPSTREAM_CONFIG_KEY, MalformedIndexLine, find_version
from cratemirror.config.schema import Config, ConfigError, parse_duration
from cratemirror.fleet.storage.disk import CrateMeta, IndexEntry, Store, sha256_stream
from cratemirror.fleet.storage.ledger import STORED
from cratemirror.names import CrateName, InvalidRequest
from cratemirror.policy.bundle import MANIFEST_KEY, export_advisory_db
from cratemirror.tools.bundle import (
    MANIFEST,
    TOOLCHAINS_MEMBER,
    crate_member,
    index_member,
    manifest_document,
    registry_member,
)
from cratemirror.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Progress,
    bucket_failure,
    error,
    extra_stores,
    format_size,
    open_existing_store,
    plural,
    tool_config,
    uses_bucket,
)
from cratemirror.tools.lockfile import accepted_sources, read_lockfiles, registry_sources


@dataclass
class Selection:
    metas: Iterator[CrateMeta] = field(default_factory=lambda: iter(()))  # by name, then version
    problems: list[str] = field(default_factory=list)  # wanted but not cached


class Records:
    """The manifest's entries of one kind, spooled to a temp file as JSON lines: memory stays flat."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.count = 0

    def append(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.count += 1

    def lines(self) -> Iterator[str]:
        self.file.seek(0)
        for line in self.file:
            yield line.rstrip("\n")

    def close(self) -> None:
        self.file.close()


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


def select(
    store: Store,
    since: float | None,
    lockfiles: Sequence[str] | None,
    upstream: str,
    accepted: Sequence[str] | None = None,
) -> Selection:
    """What goes in: by last use (the ledger, streamed), by lockfile (one lookup per locked crate), or
    everything (streamed). `accepted`: the lockfile source ids of this registry (default: crates.io's
    and `upstream`)."""
    if since is not None:
        cutoff = time.time() - since
        return Selection(
            iter(
                CrateMeta(row.name, row.version, row.sha256, row.size, row.fetched_at)
                for row in store.iter_ledger()
                if row.state == STORED and max(row.last_used, row.fetched_at) >= cutoff
            )
        )
    if not lockfiles:
        return Selection(store.iter_crate_metas())
    selection = Selection()
    locked = read_lockfiles(lockfiles, accepted or accepted_sources([upstream]))
    selection.problems.extend(locked.conflicts)
    chosen: list[CrateMeta] = []
    for crate in locked.crates:
        meta = _cached_meta(store, crate.name, crate.version)
        if meta is None:
            selection.problems.append(f"MISSING {crate.name} {crate.version}: not in the cache")
        elif crate.checksum is not None and crate.checksum != meta.sha256:
            selection.problems.append(
                f"MISMATCH {crate.name} {crate.version}: the lockfile's checksum {crate.checksum} "
                f"differs from the cached crate's {meta.sha256}"
            )
        else:
            chosen.append(meta)
    selection.metas = iter(sorted(chosen, key=lambda meta: (meta.name, meta.version)))
    return selection


def _cached_meta(store: Store, name: str, version: str) -> CrateMeta | None:
    """The lockfile spells the name as the registry does; the cache folder may differ only in case."""
    meta = store.get_crate_meta(name, version)
    if meta is not None:
        return meta
    entry = store.get_index(name.lower())
    if entry is None or entry.status != 200:
        return None
    try:
        record = find_version(entry.body, CrateName(name), version)
    except (MalformedIndexLine, InvalidRequest):
        return None
    return store.get_crate_meta(record.name, version) if record is not None else None


def _add_bytes(tar: tarfile.TarFile, name: str, body: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(body))
    vars(tar)["members"].clear()  # tarfile keeps every header it wrote; nothing reads them


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
            vars(tar)["members"].clear()
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
    tar: tarfile.TarFile, store: Store, metas: Iterator[CrateMeta], total: int, advisory_db: Path | None
) -> ExportResult:
    """Crates (each crate's index file right after its last version), then the manifest (it lists
    both). `metas` come grouped by name, so only the current crate's index file is held."""
    result = ExportResult()
    progress = Progress("export", total)
    current: tuple[str, IndexEntry | None, bool] | None = None  # (name, its index file, any crate in)
    for meta in metas:
        if current is None or current[0] != meta.name:
            _close_crate(tar, current, result)
            current = (meta.name, _cached_index(store, meta.name.lower()), False)
        before = len(result.problems)
        _add_crate(tar, store, meta, current[1], result)
        for problem in result.problems[before:]:
            progress.note(problem)
        if len(result.problems) == before:
            current = (current[0], current[1], True)
        progress.step(f"{meta.name} {meta.version}")
    _close_crate(tar, current, result)
    progress.finish()
    finish_bundle(tar, result, store.get_json(UPSTREAM_CONFIG_KEY), advisory_db)
    return result


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
        _write_manifest(manifest, head, {"crates": result.crates, "index_files": result.index_files})
        info = tarfile.TarInfo(MANIFEST)
        info.size = manifest.tell()
        info.mtime = int(time.time())
        info.mode = 0o644
        manifest.seek(0)
        tar.addfile(info, manifest)


def _write_manifest(out: IO[bytes], head: dict[str, Any], lists: dict[str, Records]) -> None:
    """The manifest document, its long lists streamed from their spools."""
    text = json.dumps({key: value for key, value in head.items() if key not in lists}, indent=1)
    out.write(text[: -len("\n}")].encode())
    for key, records in lists.items():
        out.write(f',\n "{key}": ['.encode())
        for number, line in enumerate(records.lines()):
            out.write(("," if number else "").encode() + b"\n  " + line.encode())
        out.write(b"\n ]")
    out.write(b"\n}")


def _close_crate(
    tar: tarfile.TarFile, current: tuple[str, IndexEntry | None, bool] | None, result: ExportResult
) -> None:
    if current is None or not current[2]:
        return
    name, entry, _ = current
    assert entry is not None  # a crate goes in only with its index line
    _add_bytes(tar, index_member(name), entry.body, time.time())
    result.index_files.append(_index_record(name, entry))


def write_bundle(
    store: Store,
    metas: Iterator[CrateMeta],
    target: Path,
    advisory_db: Path | None = None,
    nested: Sequence[tuple[str, Path]] = (),
    total: int = 0,
    toolchains: Path | None = None,
) -> ExportResult:
    """Write the tar next to `target`, then rename it into place: no half-written bundle is left.
    `nested`: (registry name, bundle file) of extra registries, carried as registries/<name>.tar;
    `toolchains`: the toolchain files (tools/toolchain_bundle.py), carried as toolchains.tar."""
    with bundle_file(target) as tar:
        members = [(registry_member(name), path) for name, path in nested]
        if toolchains is not None:
            members.append((TOOLCHAINS_MEMBER, toolchains))
        for member, path in members:
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = path.stat().st_size, int(time.time()), 0o644
            with open(path, "rb") as handle:
                tar.addfile(info, handle)
        result = _write_members(tar, store, metas, total, advisory_db)
    result.close()  # the spooled manifest entries; their counts stay
    return result


@contextlib.contextmanager
def bundle_file(target: Path) -> Iterator[tarfile.TarFile]:
    """A tar written next to `target`, synced and renamed into place only if the block ends well."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open(partial, "wb") as out:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                yield tar
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


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
    target = Path(args.bundle)
    if uses_bucket(config):
        return _export_bucket(config, target, since, args.lockfile, advisory_db)
    store = open_existing_store(config)
    extras = extra_stores(config)
    nested: list[tuple[str, Path]] = []
    problems = 0
    try:
        # Each extra registry's working set as a bundle of its own, carried inside this one.
        for name, extra in extras:
            accepted = registry_sources(config.registries[name].index_url)
            chosen = select(extra, since, args.lockfile, "", accepted)
            for problem in chosen.problems:
                print(f"export [{name}]: {problem}", file=sys.stderr)
            path = target.with_name(f".{target.name}.{name}.{os.getpid()}.part")
            try:
                written = write_bundle(extra, chosen.metas, path, total=extra.ledger.totals()[1])
            except OSError as exc:
                return error(f"cannot write bundle {target}: {exc.strerror or exc}")
            nested.append((name, path))
            problems += len(chosen.problems) + len(written.problems)
            print(
                f"export [{name}]: {plural(written.crates.count, 'crate')} "
                f"({format_size(written.crate_bytes)}) and {plural(written.index_files.count, 'index file')}"
            )
        toolchains = _export_toolchains(config, args.toolchain or [], target)
        if toolchains is not None:
            problems += toolchains[1]
        selection = select(store, since, args.lockfile, config.upstream.index_url)
        for problem in selection.problems:
            print(f"export: {problem}", file=sys.stderr)
        try:
            result = write_bundle(
                store, selection.metas, target, advisory_db, nested, store.ledger.totals()[1],
                toolchains[0] if toolchains is not None else None,
            )  # fmt: skip
        except OSError as exc:
            return error(f"cannot write bundle {target}: {exc.strerror or exc}")
    finally:
        store.close()
        for _, extra in extras:
            extra.close()
        for path in [path for _, path in nested] + [target.with_name(f".{target.name}.toolchains.part")]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    problems += len(selection.problems) + len(result.problems)
    return _summary(result, target, problems)


def _export_toolchains(config: Config, specs: Sequence[str], target: Path) -> tuple[Path, int] | None:
    """`--toolchain SPEC ...`: the cached toolchain files as the inner toolchains.tar; (file, problems)."""
    if not specs:
        return None
    from cratemirror.tools.toolchain_bundle import export_toolchains

    path = target.with_name(f".{target.name}.toolchains.part")
    counts = export_toolchains(config, specs, path)
    for problem in counts.problems:
        print(f"export: {problem}", file=sys.stderr)
    print(f"export: {plural(counts.files, 'toolchain file')} ({format_size(counts.size)})")
    return path, len(counts.problems)


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


def _export_bucket(
    config: Config,
    target: Path,
    since: float | None,
    lockfiles: Sequence[str] | None,
    advisory_db: Path | None,
) -> int:
    if lockfiles:
        raise ConfigError(
            f"{config.source}: storage.backend: --lockfile works on a cache dir (backend local); "
            "with s3, export everything or use --since"
        )
    from botocore.exceptions import BotoCoreError, ClientError

    from cratemirror.tools.export_bucket import export_from_bucket

    try:
        result = export_from_bucket(config, target, since, advisory_db)
    except OSError as exc:
        return error(f"cannot write bundle {target}: {exc.strerror or exc}")
    except (BotoCoreError, ClientError) as exc:
        return error(bucket_failure(exc))
    return _summary(result, target, len(result.problems))
