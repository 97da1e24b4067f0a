"""Reading Cargo.lock (format versions 1 to 4): which crates.io packages, at which versions and checksums."""

from __future__ import annotations

import collections
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cratemirror.config.schema import ConfigError
from cratemirror.names import InvalidRequest, parse_crate_version

# Cargo.lock keeps crates.io's source id even when cargo fetched through a mirror (source replacement).
CRATES_IO_SOURCES = (
    "registry+https://github.com/rust-lang/crates.io-index",
    "sparse+https://index.crates.io/",
)

_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
# Format 1 keeps checksums apart: [metadata] "checksum <name> <version> (<source>)" = "<sha256>".
_V1_KEY_RE = re.compile(r"checksum (\S+) (\S+) \((.+)\)")


@dataclass(frozen=True, slots=True)
class LockedCrate:
    name: str
    version: str
    checksum: str | None  # lowercase sha256, when the lockfile records one


@dataclass
class LockedSet:
    """The registry crates of one or more lockfiles, deduplicated, plus what was left out."""

    crates: list[LockedCrate] = field(default_factory=list)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)  # kind -> count
    conflicts: list[str] = field(default_factory=list)  # same version, different checksums

    def skipped_text(self) -> str:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.skipped.items()))
        return f"{sum(self.skipped.values())} skipped ({kinds or 'git/path'})"


def source_kind(source: str | None, accepted: Sequence[str]) -> str | None:
    """None for a package to take; else why it is skipped: path, git, other registry."""
    if source is None:
        return "path"  # workspace members and path dependencies have no source
    if source in accepted:
        return None
    if source.startswith("git+"):
        return "git"
    return "other registry"


def accepted_sources(extra_index_urls: Iterable[str] = ()) -> tuple[str, ...]:
    """crates.io's ids, plus `sparse+<url>` for registries the mirror's upstream is (a lockfile made
    against the upstream directly, without source replacement, records that)."""
    extra = [f"sparse+{url.rstrip('/')}/" for url in extra_index_urls]
    return (*CRATES_IO_SOURCES, *extra)


def registry_sources(index_url: str) -> tuple[str, ...]:
    """The source ids a lockfile records for packages of the registry at `index_url` (source
    replacement keeps the original URL, so these are what a build through the mirror writes too)."""
    bare = index_url.rstrip("/")
    return (f"sparse+{bare}/", f"registry+{bare}", f"registry+{bare}/")


def parse_lockfile(text: str, origin: str, accepted: Sequence[str] = CRATES_IO_SOURCES) -> LockedSet:
    """The registry packages of one Cargo.lock; ConfigError (a usage error) if it is not one."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not a Cargo.lock: {exc}") from None
    packages = document.get("package", [])
    if not isinstance(packages, list):
        raise ConfigError(f"{origin}: not a Cargo.lock: 'package' is not an array of tables")
    v1_checksums = _v1_checksums(document.get("metadata"))
    result = LockedSet()
    for package in packages:
        name, version, source = _package_fields(package, origin)
        skip = source_kind(source, accepted)
        if skip is not None:
            result.skipped[skip] += 1
            continue
        try:
            parse_crate_version(name, version)  # names and versions become URLs and paths later
        except InvalidRequest as exc:
            raise ConfigError(f"{origin}: {name} {version}: {exc}") from None
        checksum = package.get("checksum") or v1_checksums.get((name, version, source or ""))
        result.crates.append(LockedCrate(name, version, _checksum(checksum, origin, name, version)))
    return result


def read_lockfiles(paths: Sequence[str], accepted: Sequence[str] = CRATES_IO_SOURCES) -> LockedSet:
    """Several lockfiles merged: each name/version once. Unreadable files are usage errors."""
    merged = LockedSet()
    seen: dict[tuple[str, str], LockedCrate] = {}
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{path}: cannot read lockfile: {reason}") from None
        one = parse_lockfile(text, path, accepted)
        merged.skipped.update(one.skipped)
        for crate in one.crates:
            known = seen.get((crate.name, crate.version))
            if known is None:
                seen[(crate.name, crate.version)] = crate
                merged.crates.append(crate)
            elif crate.checksum and known.checksum and crate.checksum != known.checksum:
                merged.conflicts.append(
                    f"{crate.name} {crate.version}: lockfiles disagree on its checksum "
                    f"({known.checksum} vs {crate.checksum} in {path})"
                )
    return merged


def _package_fields(package: Any, origin: str) -> tuple[str, str, str | None]:
    if not isinstance(package, dict):
        raise ConfigError(f"{origin}: not a Cargo.lock: a [[package]] entry is not a table")
    name, version, source = package.get("name"), package.get("version"), package.get("source")
    if not isinstance(name, str) or not isinstance(version, str):
        raise ConfigError(f"{origin}: not a Cargo.lock: a [[package]] has no name or version")
    if source is not None and not isinstance(source, str):
        raise ConfigError(f"{origin}: {name} {version}: 'source' is not a string")
    return name, version, source


def _checksum(value: object, origin: str, name: str, version: str) -> str | None:
    if value is None or value == "<none>":
        return None
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ConfigError(f"{origin}: {name} {version}: checksum is not a sha256: {value!r}")
    return value.lower()


def _v1_checksums(metadata: object) -> dict[tuple[str, str, str], str]:
    found: dict[tuple[str, str, str], str] = {}
    if not isinstance(metadata, dict):
        return found
    for key, value in metadata.items():
        match = _V1_KEY_RE.fullmatch(key)
        if match and isinstance(value, str):
            found[(match.group(1), match.group(2), match.group(3))] = value
    return found
