"""`cratemirror import BUNDLE`: verify every checksum in a bundle, then load what matched into the cache.

A crate is loaded only if its bytes hash to the manifest's sha256 AND to the `cksum` of its line in the
bundled index file (the check cargo itself makes). Nothing is extracted with tarfile: each member is read
and copied into a temp file from Store.new_temp_file(), then committed like a fill, and every destination
path is built from validated names. Absolute or `..` member names are refused and never written anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import re
import sqlite3
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol, overload
from urllib.parse import urlsplit

import ijson
from cachetools import LRUCache
from ijson.common import ObjectBuilder

from cratemirror.cache.index import UPSTREAM_CONFIG_KEY, MalformedIndexLine, body_etag, find_version
from cratemirror.cache.registry import registry_cache_dir
from cratemirror.config.schema import Config, ConfigError
from cratemirror.fleet.storage.disk import CrateMeta, IndexEntry, Store, sha256_stream
from cratemirror.names import InvalidRequest, parse_crate_version, parse_name
from cratemirror.policy.bundle import PREFIX as ADVISORY_PREFIX
from cratemirror.policy.bundle import DbImport, import_advisory_db
from cratemirror.tools.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    crate_member,
    index_member,
    registry_member,
)
from cratemirror.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Progress,
    error,
    format_size,
    plural,
    tool_config,
    uses_bucket,
)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # about 300,000 crate entries
MAX_HEADER_TEXT = 256
# What may go into an ETag / Last-Modified header: visible ASCII and spaces, no CR/LF.
_HEADER_SAFE = re.compile(rf"[\x20-\x7e]{{1,{MAX_HEADER_TEXT}}}")
COMMIT_BATCH = 500  # crates per store.commit_crates: two filesystem syncs and two transactions each
INDEX_BODIES_HELD = 64
STREAMED = ("crates", "index_files")  # the manifest's long lists: read an entry at a time
MAX_MANIFEST_DEPTH = 32  # a manifest nests 3 deep; the crate list is streamed only after this check


class ImportTarget(Protocol):
    """Where `import` loads verified crates and index files: a cache dir's Store, or the shared bucket
    (import_bucket.BucketTarget)."""

    def get_crate_meta(self, name: str, version: str) -> CrateMeta | None: ...

    def crate_path(self, name: str, version: str) -> Path: ...

    def new_temp_file(self) -> Path: ...

    def commit_crates(self, batch: list[tuple[Path, CrateMeta]]) -> None: ...

    def get_index(self, lower_name: str) -> IndexEntry | None: ...

    def put_index(self, lower_name: str, entry: IndexEntry) -> None: ...

    def get_json(self, key: str) -> Any: ...

    def put_json(self, key: str, value: Any) -> None: ...


class BundleError(Exception):
    """The file is not a bundle this version can read."""


@dataclass(frozen=True, slots=True)
class Caps:
    """The server's own caps on what enters the cache (upstream.max_index_size / max_crate_size): a
    bundle is another way in, held to the same sizes, checked against the tar header before a copy."""

    index: int
    crate: int

    @classmethod
    def of(cls, config: Config) -> Caps:
        return cls(config.upstream.max_index_size, config.upstream.max_crate_size)


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


def _path_problem(name: str) -> str | None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        return "path outside the bundle (absolute, '..' or '\\'): nothing written"
    return None


@dataclass(frozen=True, slots=True)
class Member:
    """Where a regular member's bytes are: all that is kept of its header."""

    name: str
    offset: int
    size: int

    def info(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.offset_data, info.size, info.type = self.offset, self.size, tarfile.REGTYPE
        return info


class Members:
    """Where each regular member's bytes are, in a throwaway SQLite file rather than in memory: a
    bundle of 100,000 crates costs the importer no more memory than one of ten. `pop` hands a member
    out once; what nobody asked for is left over for the report."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="cratemirror-import-")
        self.db = sqlite3.connect(Path(self._dir.name) / "members.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute(
            "CREATE TABLE members (name TEXT PRIMARY KEY, tar_name TEXT, offset INTEGER, size INTEGER,"
            " copies INTEGER NOT NULL DEFAULT 1, taken INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID"
        )
        self.db.execute("BEGIN")

    def add(self, name: str, member: tarfile.TarInfo) -> None:
        self.db.execute(
            "INSERT INTO members (name, tar_name, offset, size) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET copies = copies + 1",
            (name, member.name, member.offset_data, member.size),
        )

    def drop_duplicates(self) -> list[str]:
        """A name that appears twice is refused entirely: which copy is "the" member is ambiguous."""
        self.db.execute("COMMIT")
        rows = self.db.execute("SELECT name FROM members WHERE copies > 1 ORDER BY name").fetchall()
        self.db.execute("DELETE FROM members WHERE copies > 1")
        return [str(name) for (name,) in rows]

    @overload
    def pop(self, name: str) -> tarfile.TarInfo: ...
    @overload
    def pop(self, name: str, default: None) -> tarfile.TarInfo | None: ...

    def pop(self, name: str, default: object = KeyError) -> tarfile.TarInfo | None:
        """As dict.pop: the member (a header enough to read it), once; KeyError without a default."""
        row = self.db.execute(
            "SELECT tar_name, offset, size FROM members WHERE name = ? AND taken = 0", (name,)
        ).fetchone()
        if row is None:
            if default is KeyError:
                raise KeyError(name)
            return None
        self.db.execute("UPDATE members SET taken = 1 WHERE name = ?", (name,))
        return Member(str(row[0]), int(row[1]), int(row[2])).info()

    def __iter__(self) -> Iterator[str]:
        """The names nobody has taken yet (a snapshot: popping while iterating is fine)."""
        return iter(list(self.left_over()))

    def left_over(self) -> Iterator[str]:
        for (name,) in self.db.execute("SELECT name FROM members WHERE taken = 0 ORDER BY name"):
            yield str(name)

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()


def safe_members(tar: tarfile.TarFile, result: ImportResult) -> Members:
    """Regular members with plain relative names; everything else is refused. One pass over the
    headers (tarfile's own list of them is emptied as it goes)."""
    members = Members()
    while (member := tar.next()) is not None:
        vars(tar)["members"].clear()  # tarfile keeps every header it read; memory stays flat without
        problem = _path_problem(member.name)
        if problem is None and member.isdir():
            continue  # a bundle re-packed with `tar` may list directories; they carry nothing
        if problem is None and not member.isfile():
            problem = "not a regular file (a link or device): nothing written"
        if problem is not None:
            result.refused_members.append(f"{member.name!r}: {problem}")
            continue
        members.add(member.name.removeprefix("./"), member)
    for name in members.drop_duplicates():
        result.refused_members.append(f"{name!r}: appears more than once in the bundle")
    return members


def _open_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    handle = tar.extractfile(member)
    assert handle is not None  # a regular file
    return handle


@dataclass
class Manifest:
    """The manifest without its crate list, which `crates()` streams (it may hold 100,000 entries)."""

    head: dict[str, Any]
    crate_count: int
    tar: tarfile.TarFile
    member: tarfile.TarInfo

    def crates(self) -> Iterator[object]:
        yield from ijson.items(_open_member(self.tar, self.member), "crates.item", use_float=True)

    def index_files(self) -> Iterator[object]:
        yield from ijson.items(_open_member(self.tar, self.member), "index_files.item", use_float=True)


def read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> Manifest:
    """One streaming pass: every top-level value but the crate list is built, the crates are counted;
    the whole document is parsed, so a second pass over the crates cannot fail halfway."""
    if member is None:
        raise BundleError(f"no {MANIFEST}: not a cratemirror bundle")
    if member.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST} is implausibly large ({format_size(member.size)})")
    head: dict[str, Any] = {}
    kinds: dict[str, str] = {}  # top-level key -> the first event of its value (start_array: a list)
    crate_count = 0
    key = ""
    builder: ObjectBuilder | None = None
    depth = 0
    try:
        # basic_parse: no prefix strings, so a deeply nested document costs linear time.
        for event, value in ijson.basic_parse(_open_member(tar, member), use_float=True):
            outer = depth
            if event in ("start_map", "start_array"):
                depth += 1
                if depth > MAX_MANIFEST_DEPTH:
                    raise RecursionError
            elif event in ("end_map", "end_array"):
                depth -= 1
            if outer == 0:
                if event != "start_map":
                    raise BundleError(f"{MANIFEST} does not describe a {FORMAT}")
                continue
            if outer == 1 and event == "map_key":
                key = str(value)
                builder = None if key in STREAMED else ObjectBuilder()
                continue
            if outer == 1:
                kinds.setdefault(key, event)
            elif key == "crates" and outer == 2 and event not in ("end_array", "end_map", "map_key"):
                crate_count += 1
            if builder is not None and depth >= 1:
                builder.event(event, value)
                if depth == 1:  # the value is complete
                    head[key] = builder.value
    except ijson.JSONError as exc:
        raise BundleError(f"{MANIFEST} is not valid JSON: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise BundleError(f"{MANIFEST} is nested too deeply to be a manifest") from None
    if head.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST} does not describe a {FORMAT}")
    if head.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {head.get('format_version')!r}; "
            f"this cratemirror reads version {FORMAT_VERSION}"
        )
    for name in ("crates", "index_files"):
        if kinds.get(name) != "start_array":
            raise BundleError(f"{MANIFEST}: {name!r} is not a list")
    return Manifest(head, crate_count, tar, member)


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
        body = _open_member(self.tar, Member(tar_name, offset, size).info()).read(self.max_index_size)
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
    batch: list[tuple[Path, CrateMeta]],
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
    existing = store.get_crate_meta(name, version)
    if existing is not None and existing.sha256 == record.cksum and store.crate_path(name, version).exists():
        result.already += 1
        return f"already cached {label}"
    temp = store.new_temp_file()
    verified = False
    try:
        with open(temp, "wb") as out:  # made durable by the batch's filesystem sync
            digest, size = sha256_stream(_open_member(tar, member), out)
        if digest != expected:
            return _refuse(result, f"{label}: bytes hash to {digest}, the manifest says {expected}")
        if digest != record.cksum:
            return _refuse(
                result, f"{label}: bytes hash to {digest}, its index line's cksum is {record.cksum}"
            )
        batch.append((temp, CrateMeta(name, version, digest, size, time.time())))
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
    held = store.get_index(lower)
    if held is not None and held.status == 200 and held.checked_at >= checked_at:
        result.index_kept += 1
        return
    last_modified = _http_date(index.record.get("last_modified"), now) or formatdate(checked_at, usegmt=True)
    # The upstream's validators are not carried over: a forged body with the upstream's real ETag
    # would be confirmed by a 304 forever. Once online, the first revalidation fetches the file.
    entry = IndexEntry(200, index.body, body_etag(index.body), last_modified, checked_at)
    store.put_index(lower, entry)
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
    replace_advisory_db: bool = False,
) -> ImportResult:
    result = ImportResult()
    members = safe_members(tar, result)
    try:
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
    batch: list[tuple[Path, CrateMeta]] = []
    try:
        for entry in manifest.crates():
            line = import_crate(tar, members, entry, indexes, store, result, batch, caps.crate)
            if line.startswith("REFUSED"):
                progress.note(line)  # stays visible on a terminal too
                progress.step("refused")
            else:
                progress.step(line, line)
            if len(batch) >= COMMIT_BATCH:
                store.commit_crates(batch)
                batch.clear()
        store.commit_crates(batch)
        batch.clear()
    finally:
        for temp, _ in batch:  # a failure mid-batch: nothing half-loaded stays behind
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
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
    if uses_bucket(config):
        from cratemirror.tools.import_bucket import import_into_bucket

        try:
            return _report(import_into_bucket(config, bundle, args.replace_advisory_db), config, None)
        except (tarfile.TarError, BundleError) as exc:
            return error(f"{bundle}: {exc}")
        except OSError as exc:
            return error(f"{bundle}: {exc.strerror or exc}")
    try:
        store = Store(config.cache.dir)
        registries = {name: Store(registry_cache_dir(config.cache.dir, name)) for name in config.registries}
    except OSError as exc:
        return error(f"cannot open the cache dir {config.cache.dir}: {exc.strerror or exc}")
    try:
        with tarfile.open(bundle, "r:*") as tar:
            result = import_bundle(
                tar, store, config.policy.advisory_db, registries, caps=Caps.of(config),
                replace_advisory_db=args.replace_advisory_db,
            )  # fmt: skip
        cached_bytes = store.crate_bytes()
    except (tarfile.TarError, BundleError) as exc:
        return error(f"{bundle}: {exc}")
    except OSError as exc:
        return error(f"{bundle}: {exc.strerror or exc}")
    finally:
        store.close()
        for extra in registries.values():
            extra.close()
    return _report(result, config, cached_bytes)


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
