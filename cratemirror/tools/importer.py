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
import os
import re
import sys
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from cratemirror.config import ConfigError
from cratemirror.index import UPSTREAM_CONFIG_KEY, MalformedIndexLine, body_etag, find_version
from cratemirror.names import InvalidRequest, parse_crate_version, parse_name
from cratemirror.policy.bundle import DbImport, import_advisory_db
from cratemirror.registry import registry_cache_dir
from cratemirror.store import CrateMeta, IndexEntry, Store, sha256_stream
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
)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # about 300,000 crate entries
MAX_INDEX_BYTES = 64 * 1024 * 1024  # as upstream.max_index_size's default
MAX_HEADER_TEXT = 256
# What may go into an ETag / Last-Modified header: visible ASCII and spaces, no CR/LF.
_HEADER_SAFE = re.compile(rf"[\x20-\x7e]{{1,{MAX_HEADER_TEXT}}}")


class BundleError(Exception):
    """The file is not a bundle this version can read."""


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


def safe_members(tar: tarfile.TarFile, result: ImportResult) -> dict[str, tarfile.TarInfo]:
    """Regular members with plain relative names; everything else is refused. A name that appears
    twice is refused entirely: which copy is "the" member would be ambiguous."""
    members: dict[str, tarfile.TarInfo] = {}
    duplicates: set[str] = set()
    for member in tar.getmembers():
        problem = _path_problem(member.name)
        if problem is None and member.isdir():
            continue  # a bundle re-packed with `tar` may list directories; they carry nothing
        if problem is None and not member.isfile():
            problem = "not a regular file (a link or device): nothing written"
        if problem is not None:
            result.refused_members.append(f"{member.name!r}: {problem}")
            continue
        name = member.name.removeprefix("./")
        if name in members or name in duplicates:
            duplicates.add(name)
            members.pop(name, None)
            continue
        members[name] = member
    for name in sorted(duplicates):
        result.refused_members.append(f"{name!r}: appears more than once in the bundle")
    return members


def read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> dict[str, Any]:
    if member is None:
        raise BundleError(f"no {MANIFEST}: not a cratemirror bundle")
    if member.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST} is implausibly large ({format_size(member.size)})")
    handle = tar.extractfile(member)
    assert handle is not None  # a regular file
    try:
        document = json.loads(handle.read(MAX_MANIFEST_BYTES + 1))
    except ValueError as exc:
        raise BundleError(f"{MANIFEST} is not valid JSON: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise BundleError(f"{MANIFEST} is nested too deeply to be a manifest") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST} does not describe a {FORMAT}")
    if document.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {document.get('format_version')!r}; "
            f"this cratemirror reads version {FORMAT_VERSION}"
        )
    for key in ("crates", "index_files"):
        if not isinstance(document.get(key), list):
            raise BundleError(f"{MANIFEST}: {key!r} is not a list")
    return document


def _sha256_field(entry: dict[str, Any]) -> str:
    value = entry.get("sha256")
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ValueError(f"sha256 {value!r} is not a lowercase hex sha256")
    return value


def read_index_files(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], manifest: dict[str, Any], result: ImportResult
) -> dict[str, BundledIndex]:
    """The bundled index files whose bodies match the manifest, keyed by lowercased crate name."""
    found: dict[str, BundledIndex] = {}
    for entry in manifest["index_files"]:
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
        if member.size > MAX_INDEX_BYTES:
            result.refused_index.append(
                f"index file of {crate.name}: {format_size(member.size)}, over {format_size(MAX_INDEX_BYTES)}"
            )
            continue
        handle = tar.extractfile(member)
        assert handle is not None
        body = handle.read(MAX_INDEX_BYTES)
        digest = hashlib.sha256(body).hexdigest()
        if digest != expected:
            result.refused_index.append(
                f"index file of {crate.name}: body hashes to {digest}, the manifest says {expected}"
            )
            continue
        found[crate.lower] = BundledIndex(crate.name, body, entry)
    return found


def import_crate(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    entry: object,
    indexes: dict[str, BundledIndex],
    store: Store,
    result: ImportResult,
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
    try:
        source = tar.extractfile(member)
        assert source is not None
        with open(temp, "wb") as out:
            digest, size = sha256_stream(source, out)
            out.flush()
            os.fsync(out.fileno())
        if digest != expected:
            return _refuse(result, f"{label}: bytes hash to {digest}, the manifest says {expected}")
        if digest != record.cksum:
            return _refuse(
                result, f"{label}: bytes hash to {digest}, its index line's cksum is {record.cksum}"
            )
        store.commit_crate(temp, CrateMeta(name, version, digest, size, time.time()))
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()  # still there only if refused or failed
    result.loaded += 1
    result.loaded_bytes += size
    return f"loaded {label}"


def _refuse(result: ImportResult, reason: str) -> str:
    result.refused_crates.append(reason)
    return f"REFUSED {reason}"


def store_index_files(store: Store, indexes: dict[str, BundledIndex], result: ImportResult) -> None:
    """Load index files, unless the cache holds a copy checked more recently than the bundle's."""
    now = time.time()
    for lower, index in indexes.items():
        # The manifest is input from another network: a date in the future would keep a forged file
        # "fresh" forever, so it counts as checked no later than now (an old date: revalidated soon).
        checked_at = min(_number(index.record.get("checked_at")), now)
        held = store.get_index(lower)
        if held is not None and held.status == 200 and held.checked_at >= checked_at:
            result.index_kept += 1
            continue
        last_modified = _http_date(index.record.get("last_modified"), now) or formatdate(
            checked_at, usegmt=True
        )
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


def store_upstream_config(store: Store, manifest: dict[str, Any]) -> None:
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
    members: dict[str, tarfile.TarInfo],
    registries: Mapping[str, Store],
    result: ImportResult,
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
            sub = import_bundle(inner, registries[registry])
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
    store: Store,
    advisory_db: Path | None = None,
    registries: Mapping[str, Store] | None = None,
) -> ImportResult:
    result = ImportResult()
    members = safe_members(tar, result)
    import_nested(tar, members, registries or {}, result)
    manifest = read_manifest(tar, members.pop(MANIFEST, None))
    indexes = read_index_files(tar, members, manifest, result)
    # Index files first, as a fill does: a crate in the cache always has its index line there too.
    store_index_files(store, indexes, result)
    crates = manifest["crates"]
    result.crates_listed += len(crates)
    progress = Progress("import", len(crates))
    for entry in crates:
        line = import_crate(tar, members, entry, indexes, store, result)
        if line.startswith("REFUSED"):
            progress.note(line)  # stays visible on a terminal too
            progress.step("refused")
        else:
            progress.step(line, line)
    progress.finish()
    result.advisory_db = import_advisory_db(tar, members, manifest, advisory_db)
    result.refused_members.extend(result.advisory_db.refused)
    for name in sorted(members):
        result.refused_members.append(f"{name!r}: not listed in the manifest")
    store_upstream_config(store, manifest)
    return result


def run_import(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    if not bundle.is_file():
        raise ConfigError(f"{args.bundle}: expected a bundle file written by `cratemirror export`")
    config = tool_config(args)
    try:
        store = Store(config.cache.dir)
        registries = {name: Store(registry_cache_dir(config.cache.dir, name)) for name in config.registries}
    except OSError as exc:
        return error(f"cannot open the cache dir {config.cache.dir}: {exc.strerror or exc}")
    try:
        with tarfile.open(bundle, "r:*") as tar:
            result = import_bundle(tar, store, config.policy.advisory_db, registries)
        cached_bytes = store.crate_bytes()
    except (tarfile.TarError, BundleError) as exc:
        return error(f"{bundle}: {exc}")
    except OSError as exc:
        return error(f"{bundle}: {exc.strerror or exc}")
    finally:
        store.close()
        for extra in registries.values():
            extra.close()
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
            f"{result.advisory_db.target}"
        )
    if cached_bytes > config.cache.max_size:
        print(
            f"import: the cache now holds {format_size(cached_bytes)}, over cache.max_size "
            f"({format_size(config.cache.max_size)}): the server evicts least-recently-used crates on its "
            "next download, or run `cratemirror prune`"
        )
    return EXIT_FAILURE if result.refused else EXIT_OK
