"""`cratemirror import BUNDLE`: verify every checksum in a bundle, then load what matched into the store.

Written once against the storage seam (ArtifactStore): into the cache dir, or with storage.backend s3
into the bucket every replica shares. A crate is loaded only if its bytes hash to the manifest's sha256
AND to the `cksum` of its line in the bundled index file (the check cargo itself makes). Nothing is
extracted with tarfile: each member is read and copied into a temp file from the store's
new_temp_file(), then put through put_crates (a cache dir: committed like a fill; the bucket: uploaded
with its SHA-256 as the object checksum, a copy already there kept), and every destination is built
from validated names. Absolute or `..` member names are refused and never written anywhere. The tar is
read in a worker thread; the store's calls run on the event loop (ImportTarget).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import re
import sys
import tarfile
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cachetools import LRUCache

from cratemirror.cache.index import UPSTREAM_CONFIG_KEY, MalformedIndexLine, body_etag, find_version
from cratemirror.config.schema import Config, ConfigError
from cratemirror.fleet.storage import ArtifactStore, VerifiedCrate
from cratemirror.fleet.storage.disk import IndexEntry, Store, sha256_stream
from cratemirror.names import CrateName, CrateVersion, InvalidRequest, parse_crate_version, parse_name
from cratemirror.policy.bundle import PREFIX as ADVISORY_PREFIX
from cratemirror.policy.bundle import DbImport, import_advisory_db
from cratemirror.tools.bundle import (
    MANIFEST,
    TOOLCHAINS_MEMBER,
    BundleError,
    Caps,
    Manifest,
    Member,
    Members,
    crate_member,
    index_member,
    open_member,
    read_manifest,
    registry_member,
    safe_members,
)
from cratemirror.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Progress,
    backend_of,
    error,
    format_size,
    open_stores,
    plural,
    run_tool,
    tool_config,
)

T = TypeVar("T")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_HEADER_TEXT = 256
# What may go into an ETag / Last-Modified header: visible ASCII and spaces, no CR/LF.
_HEADER_SAFE = re.compile(rf"[\x20-\x7e]{{1,{MAX_HEADER_TEXT}}}")
COMMIT_BATCH = 500  # crates per put_crates (a cache dir: two filesystem syncs and two transactions)
INDEX_BODIES_HELD = 64


class ImportTarget:
    """Where `import` loads verified crates and index files: a registry's ArtifactStore (the cache dir,
    or with storage.backend s3 the bucket), whose calls run on the event loop while the importer reads
    the tar in a worker thread. `local`: the cache dir that keeps the upstream's dl config, if any."""

    def __init__(self, store: ArtifactStore, loop: asyncio.AbstractEventLoop, local: Store | None) -> None:
        self.store, self.loop, self.local = store, loop, local

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()

    def holds(self, key: CrateVersion, sha256: str) -> bool:
        """Whether the store already holds these exact bytes (recorded with this checksum)."""
        record = self._run(self.store.stat_crate(key))
        return record is not None and record.present and record.sha256 == sha256

    def new_temp_file(self) -> Path:
        return self.store.new_temp_file()

    def put_crates(self, batch: list[VerifiedCrate]) -> None:
        self._run(self.store.put_crates(batch))

    def get_index(self, crate: CrateName) -> IndexEntry | None:
        return self._run(self.store.get_index(crate))

    def put_index(self, crate: CrateName, entry: IndexEntry) -> None:
        self._run(self.store.put_index(crate, entry))

    def get_json(self, key: str) -> Any:
        return self.local.get_json(key) if self.local is not None else None

    def put_json(self, key: str, value: Any) -> None:
        if self.local is not None:
            self.local.put_json(key, value)


@dataclass(frozen=True, slots=True)
class BundledIndex:
    name: str
    body: bytes
    record: dict[str, Any]


@dataclass
class ImportResult:
    loaded: int = 0
    loaded_bytes: int = 0
    already: int = 0
    refused_crates: list[str] = field(default_factory=list)
    refused_index: list[str] = field(default_factory=list)
    refused_members: list[str] = field(default_factory=list)  # tar members that are no part of the bundle
    index_loaded: int = 0
    index_kept: int = 0
    crates_listed: int = 0
    advisory_db: DbImport = field(default_factory=DbImport)

    @property
    def refused(self) -> int:
        return len(self.refused_crates) + len(self.refused_index) + len(self.refused_members)


def _sha256_field(entry: dict[str, Any]) -> str:
    value = entry.get("sha256")
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ValueError(f"sha256 {value!r} is not a lowercase hex sha256")
    return value


class BundledIndexes:
    """The bundle's index files, each read and checked against the manifest when first needed (the
    crates come grouped by name, so only a few bodies are held at a time), and stored into the cache
    before any crate of its name: a crate in the cache always has its index line there too."""

    def __init__(
        self,
        tar: tarfile.TarFile,
        members: Members,
        manifest: Manifest,
        store: ImportTarget,
        result: ImportResult,
        max_index_size: int,
    ) -> None:
        self.tar, self.store, self.result = tar, store, result
        self.max_index_size = max_index_size
        self.db = members.db  # the listed index files go next to the members, not into memory
        self.db.execute(
            "CREATE TABLE listed (lower TEXT PRIMARY KEY, name TEXT, sha256 TEXT, record TEXT,"
            " tar_name TEXT, offset INTEGER, size INTEGER, done INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID"
        )
        self.recent: LRUCache[str, BundledIndex | None] = LRUCache(INDEX_BODIES_HELD)
        self.db.execute("BEGIN")
        for entry in manifest.index_files():
            try:
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
                crate = parse_name(str(entry.get("name")))
                expected = _sha256_field(entry)
            except (ValueError, InvalidRequest) as exc:
                result.refused_index.append(f"index file entry {entry!r}: {exc}")
                continue
            member = members.pop(index_member(crate.name), None)
            if member is None:
                result.refused_index.append(
                    f"index file of {crate.name}: listed in the manifest but not in the bundle"
                )
                continue
            if member.size > max_index_size:
                result.refused_index.append(
                    f"index file of {crate.name}: {format_size(member.size)}, "
                    f"over {format_size(max_index_size)}"
                )
                continue
            self.db.execute(
                "INSERT OR REPLACE INTO listed (lower, name, sha256, record, tar_name, offset, size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    crate.lower,
                    crate.name,
                    expected,
                    json.dumps(entry),
                    member.name,
                    member.offset_data,
                    member.size,
                ),
            )
        self.db.execute("COMMIT")

    def get(self, lower: str) -> BundledIndex | None:
        if lower in self.recent:
            return self.recent[lower]
        found = self._load(lower)
        self.recent[lower] = found
        return found

    def _load(self, lower: str) -> BundledIndex | None:
        row = self.db.execute(
            "SELECT name, sha256, record, tar_name, offset, size, done FROM listed WHERE lower = ?", (lower,)
        ).fetchone()
        if row is None:
            return None
        name, expected, record, tar_name, offset, size, done = row
        entry = json.loads(record)
        body = open_member(self.tar, Member(tar_name, offset, size).info()).read(self.max_index_size)
        digest = hashlib.sha256(body).hexdigest()
        first = not done
        self.db.execute("UPDATE listed SET done = 1 WHERE lower = ?", (lower,))
        if digest != expected:
            if first:
                self.result.refused_index.append(
                    f"index file of {name}: body hashes to {digest}, the manifest says {expected}"
                )
            return None
        index = BundledIndex(name, body, entry)
        if first:
            store_index_file(self.store, lower, index, self.result)
        return index

    def finish(self) -> None:
        """Index files no crate in the bundle needed are loaded too."""
        while True:
            rows = self.db.execute("SELECT lower FROM listed WHERE done = 0 LIMIT 1000").fetchall()
            if not rows:
                return
            for (lower,) in rows:
                self.get(lower)


def import_crate(
    tar: tarfile.TarFile,
    members: Members,
    entry: object,
    indexes: BundledIndexes,
    store: ImportTarget,
    result: ImportResult,
    batch: list[VerifiedCrate],
    max_crate_size: int,
) -> str:
    """Verify one crate and load it. Returns a progress line; refusals go to result.refused."""
    try:
        if not isinstance(entry, dict):
            raise ValueError("not an object")
        wanted = parse_crate_version(str(entry.get("name")), str(entry.get("version")))
        expected = _sha256_field(entry)
    except (ValueError, InvalidRequest) as exc:
        return _refuse(result, f"crate entry {entry!r}: {exc}")
    name, version = wanted.crate.name, wanted.version
    label = f"{name} {version}"
    member = members.pop(crate_member(name, version), None)
    if member is None:
        return _refuse(result, f"{label}: listed in the manifest but not in the bundle")
    if member.size > max_crate_size:
        return _refuse(result, f"{label}: {format_size(member.size)}, over {format_size(max_crate_size)}")
    index = indexes.get(wanted.crate.lower)
    try:
        record = find_version(index.body, wanted.crate, version) if index is not None else None
    except MalformedIndexLine as exc:
        return _refuse(result, f"{label}: {exc}")
    if record is None:
        return _refuse(result, f"{label}: no line for it in a verified index file from the bundle")
    if record.name != name:
        return _refuse(result, f"{label}: the index file spells the crate {record.name!r}")
    if store.holds(wanted, record.cksum):
        result.already += 1
        return f"already cached {label}"
    temp = store.new_temp_file()
    verified = False
    try:
        with open(temp, "wb") as out:  # made durable by the batch's filesystem sync
            digest, size = sha256_stream(open_member(tar, member), out)
        if digest != expected:
            return _refuse(result, f"{label}: bytes hash to {digest}, the manifest says {expected}")
        if digest != record.cksum:
            return _refuse(
                result, f"{label}: bytes hash to {digest}, its index line's cksum is {record.cksum}"
            )
        batch.append(VerifiedCrate(wanted, temp, digest, size, time.time()))
        verified = True
    finally:
        if not verified:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()  # refused or failed
    result.loaded += 1
    result.loaded_bytes += size
    return f"loaded {label}"


def _refuse(result: ImportResult, reason: str) -> str:
    result.refused_crates.append(reason)
    return f"REFUSED {reason}"


def store_index_file(store: ImportTarget, lower: str, index: BundledIndex, result: ImportResult) -> None:
    """Load an index file, unless the cache holds a copy checked more recently than the bundle's."""
    now = time.time()
    # The manifest is input from another network: a date in the future would keep a forged file
    # "fresh" forever, so it counts as checked no later than now (an old date: revalidated soon).
    checked_at = min(_number(index.record.get("checked_at")), now)
    held = store.get_index(CrateName(index.name))
    if held is not None and held.status == 200 and held.checked_at >= checked_at:
        result.index_kept += 1
        return
    last_modified = _http_date(index.record.get("last_modified"), now) or formatdate(checked_at, usegmt=True)
    # The upstream's validators are not carried over: a forged body with the upstream's real ETag
    # would be confirmed by a 304 forever. Once online, the first revalidation fetches the file.
    entry = IndexEntry(200, index.body, body_etag(index.body), last_modified, checked_at)
    store.put_index(CrateName(index.name), entry)
    result.index_loaded += 1


def _number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return max(0.0, float(value))
    return 0.0


def _http_date(value: object, now: float) -> str | None:
    """A Last-Modified value fit for a response header (an HTTP date, not in the future), else None."""
    if not isinstance(value, str) or not _HEADER_SAFE.fullmatch(value):
        return None
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, OverflowError):
        return None
    return value if when <= now else None


def _plain_http_url(value: object) -> bool:
    """An http(s) URL without credentials or white space: the only kind a bundle may name as `dl`."""
    if not isinstance(value, str) or not _HEADER_SAFE.fullmatch(value) or " " in value:
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc


def store_upstream_config(store: ImportTarget, manifest: dict[str, Any]) -> None:
    """Where tarballs live upstream: lets the mirror start offline; never overrides what it knows."""
    config = manifest.get("upstream_config")
    if (
        store.get_json(UPSTREAM_CONFIG_KEY) is None
        and isinstance(config, dict)
        and _plain_http_url(config.get("dl"))
    ):
        store.put_json(UPSTREAM_CONFIG_KEY, {"dl": config["dl"]})


def import_nested(
    tar: tarfile.TarFile,
    members: Members,
    registries: Mapping[str, ImportTarget],
    result: ImportResult,
    caps: Caps,
) -> None:
    """Each extra registry's bundle into that registry's cache, verified the same way; one for a
    registry this mirror does not have is refused."""
    for member_name in [name for name in members if name.startswith("registries/")]:
        member = members.pop(member_name)
        registry = next((name for name in registries if registry_member(name) == member_name), None)
        if registry is None:
            result.refused_members.append(f"{member_name!r}: no such registry in this mirror's config")
            continue
        handle = tar.extractfile(member)
        assert handle is not None  # a regular file
        with tarfile.open(fileobj=handle, mode="r:") as inner:
            sub = import_bundle(inner, registries[registry], caps=caps)
        result.loaded += sub.loaded
        result.loaded_bytes += sub.loaded_bytes
        result.already += sub.already
        result.index_loaded += sub.index_loaded
        result.index_kept += sub.index_kept
        result.crates_listed += sub.crates_listed
        result.refused_crates += [f"[{registry}] {line}" for line in sub.refused_crates]
        result.refused_index += [f"[{registry}] {line}" for line in sub.refused_index]
        result.refused_members += [f"[{registry}] {line}" for line in sub.refused_members]


def import_bundle(
    tar: tarfile.TarFile,
    store: ImportTarget,
    advisory_db: Path | None = None,
    registries: Mapping[str, ImportTarget] | None = None,
    *,
    caps: Caps,
    toolchains: Callable[[tarfile.TarFile, tarfile.TarInfo], list[str]] | None = None,
    replace_advisory_db: bool = False,
) -> ImportResult:
    """`toolchains`: loads the toolchains.tar member (tools/toolchain_bundle.py), returns what it refused."""
    result = ImportResult()
    members = safe_members(tar, result.refused_members)
    try:
        toolchain_member = members.pop(TOOLCHAINS_MEMBER, None)
        if toolchain_member is not None and toolchains is not None:
            result.refused_members += toolchains(tar, toolchain_member)
        elif toolchain_member is not None:
            result.refused_members.append(f"{TOOLCHAINS_MEMBER!r}: toolchains are not imported here")
        import_nested(tar, members, registries or {}, result, caps)
        return _import_members(tar, store, members, result, advisory_db, caps, replace_advisory_db)
    finally:
        members.close()


def _import_members(
    tar: tarfile.TarFile,
    store: ImportTarget,
    members: Members,
    result: ImportResult,
    advisory_db: Path | None,
    caps: Caps,
    replace_advisory_db: bool = False,
) -> ImportResult:
    manifest = read_manifest(tar, members.pop(MANIFEST, None))
    indexes = BundledIndexes(tar, members, manifest, store, result, caps.index)
    result.crates_listed += manifest.crate_count
    progress = Progress("import", manifest.crate_count)
    batch: list[VerifiedCrate] = []
    try:
        for entry in manifest.crates():
            line = import_crate(tar, members, entry, indexes, store, result, batch, caps.crate)
            if line.startswith("REFUSED"):
                progress.note(line)  # stays visible on a terminal too
                progress.step("refused")
            else:
                progress.step(line, line)
            if len(batch) >= COMMIT_BATCH:
                store.put_crates(batch)
                batch.clear()
        store.put_crates(batch)
        batch.clear()
    finally:
        for item in batch:  # a failure mid-batch: nothing half-loaded stays behind
            with contextlib.suppress(FileNotFoundError):
                item.path.unlink()
    progress.finish()
    indexes.finish()
    advisories = {name: members.pop(name) for name in members if name.startswith(ADVISORY_PREFIX)}
    result.advisory_db = import_advisory_db(
        tar, advisories, manifest.head, advisory_db, replace=replace_advisory_db
    )
    result.refused_members.extend(result.advisory_db.refused)
    for name in members.left_over():
        result.refused_members.append(f"{name!r}: not listed in the manifest")
    store_upstream_config(store, manifest.head)
    return result


def run_import(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    if not bundle.is_file():
        raise ConfigError(f"{args.bundle}: expected a bundle file written by `cratemirror export`")
    config = tool_config(args)
    return run_tool(config, _import(config, bundle, args.replace_advisory_db))


async def _import(config: Config, bundle: Path, replace_advisory_db: bool) -> int:
    loop = asyncio.get_running_loop()
    async with open_stores(config, create=True) as opened:
        targets = {one.name: ImportTarget(one.store, loop, one.local) for one in opened}
        main = targets.pop("")

        def work() -> ImportResult:
            with tarfile.open(bundle, "r:*") as tar:
                return import_bundle(
                    tar, main, config.policy.advisory_db, targets, caps=Caps.of(config),
                    toolchains=lambda outer, member: _import_toolchains(config, outer, member),
                    replace_advisory_db=replace_advisory_db,
                )  # fmt: skip

        try:
            result = await asyncio.to_thread(work)
        except (tarfile.TarError, BundleError) as exc:
            return error(f"{bundle}: {exc}")
        except OSError as exc:
            return error(f"{bundle}: {exc.strerror or exc}")
        # A cache dir is held to cache.max_size; the bucket has no bound of its own.
        cached_bytes = (await opened[0].store.usage())[0] if backend_of(config).bounded else None
    return _report(result, config, cached_bytes)


def _import_toolchains(config: Config, tar: tarfile.TarFile, member: tarfile.TarInfo) -> list[str]:
    """The bundle's toolchain files, each re-verified (manifests by signature); what was refused."""
    from cratemirror.tools.toolchain_bundle import import_toolchains

    loaded = import_toolchains(config, tar, member)
    print(
        f"import: toolchain files: {loaded.loaded} loaded, {loaded.already} already cached, "
        f"{len(loaded.refused)} refused"
    )
    return loaded.refused


def _report(result: ImportResult, config: Config, cached_bytes: int | None) -> int:
    """The summary lines; `cached_bytes`: the cache dir's crate bytes after (None: loaded into the bucket)."""
    for line in [*result.refused_index, *result.refused_members]:
        print(f"import: REFUSED {line}", file=sys.stderr)
    print(
        f"import: {plural(result.crates_listed, 'crate')} in the bundle: {result.loaded} loaded "
        f"({format_size(result.loaded_bytes)}), {result.already} already cached, "
        f"{len(result.refused_crates)} refused; {plural(result.index_loaded, 'index file')} loaded, "
        f"{result.index_kept} kept (newer in the cache), {len(result.refused_index)} refused"
        + (
            f"; {plural(len(result.refused_members), 'other member')} refused"
            if result.refused_members
            else ""
        )
    )
    if result.advisory_db.installed:
        print(
            f"import: {plural(result.advisory_db.installed, 'advisory', 'advisories')} installed into "
            f"{result.advisory_db.target}: {result.advisory_db.changes}"
        )
    if cached_bytes is not None and cached_bytes > config.cache.max_size:
        print(
            f"import: the cache now holds {format_size(cached_bytes)}, over cache.max_size "
            f"({format_size(config.cache.max_size)}): the server evicts least-recently-used crates on its "
            "next download, or run `cratemirror prune`"
        )
    return EXIT_FAILURE if result.refused else EXIT_OK
