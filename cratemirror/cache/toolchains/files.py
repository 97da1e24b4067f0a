"""Toolchain files in the cache dir: `<cache.dir>/toolchains/files/<validated path>`.

Only verified bytes get here (a manifest whose signature verified, with its `.asc` beside it; a
component or rustup-init whose sha256 matched), always by an atomic rename of an fsynced temp file from
`<cache.dir>/toolchains/tmp/`. A file's mtime is its recency: for a moving manifest when upstream last
confirmed it, for a component when it was last served (touched at most hourly), which is the order
eviction follows when the files outgrow toolchains.max_size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cratemirror.cache.eviction import low_water
from cratemirror.cache.toolchains.paths import Kind, ToolchainPath, parse_toolchain_path

log = logging.getLogger("cratemirror.toolchains")

TOUCH_INTERVAL = 3600.0
_EVICTABLE = (Kind.COMPONENT, Kind.RUSTUP_INIT)


@dataclass(frozen=True, slots=True)
class StoredManifest:
    body: bytes
    signature: bytes
    checked_at: float  # wall clock: when upstream last confirmed it (its mtime)


@dataclass(frozen=True, slots=True)
class Usage:
    size: int
    entries: int


class ToolchainFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.tmp_dir = root / "tmp"  # made on the first write: a mirror never asked for toolchains has none

    def path_of(self, key: ToolchainPath) -> Path:
        return self.files_dir / key.path  # validated segments only (paths.py)

    def new_temp_file(self) -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"{os.getpid()}-{os.urandom(8).hex()}.part"

    def open(self, key: ToolchainPath) -> tuple[BinaryIO, int] | None:
        """The stored file, opened (so an eviction cannot take it from under the answer), and its size."""
        try:
            handle = open(self.path_of(key), "rb")  # noqa: SIM115 - handed to the response, which closes it
        except (FileNotFoundError, NotADirectoryError):
            return None
        stat = os.fstat(handle.fileno())
        if key.kind in _EVICTABLE and time.time() - stat.st_mtime > TOUCH_INTERVAL:
            with contextlib.suppress(OSError):
                os.utime(handle.fileno())  # recency for least-recently-used eviction, at most hourly
        return handle, stat.st_size

    def read_manifest(self, key: ToolchainPath) -> StoredManifest | None:
        path = self.path_of(key)
        try:
            with open(path, "rb") as handle:
                mtime = os.fstat(handle.fileno()).st_mtime
                body = handle.read()
            signature = path.with_name(path.name + ".asc").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return StoredManifest(body, signature, mtime)

    def store_manifest(self, key: ToolchainPath, body: bytes, signature: bytes) -> None:
        """The signature first, then the manifest (whose mtime says when it was confirmed)."""
        path = self.path_of(key)
        self.write_atomic(path.with_name(path.name + ".asc"), signature)
        self.write_atomic(path, body)

    def confirm(self, key: ToolchainPath) -> None:
        """Upstream still serves the same bytes: fresh again from now."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path_of(key))

    def write_atomic(self, final: Path, data: bytes) -> None:
        temp = self.new_temp_file()
        try:
            with open(temp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            self.commit(temp, final)
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()

    def commit(self, temp: Path, final: Path) -> None:
        """Rename a complete, verified temp file into place, durably."""
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove(self, key: ToolchainPath) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path_of(key).unlink()

    def iter_stored(self) -> list[tuple[ToolchainPath, Path, os.stat_result]]:
        """Every stored file whose path this mirror would have written (anything else is left alone)."""
        found = []
        for directory, _, names in os.walk(self.files_dir):
            for name in names:
                full = Path(directory) / name
                relative = full.relative_to(self.files_dir).as_posix()
                if relative.endswith(".asc") and "/channel-rust-" in f"/{relative}":
                    continue  # a manifest's signature: goes with its manifest
                try:
                    key = parse_toolchain_path(relative)
                    stat = full.stat()
                except (ValueError, OSError):
                    continue
                found.append((key, full, stat))
        return found

    def usage(self, bounded_only: bool = False) -> Usage:
        """Bytes and files stored; `bounded_only`: only what toolchains.max_size bounds (no manifests)."""
        stored = [item for item in self.iter_stored() if not bounded_only or item[0].kind in _EVICTABLE]
        return Usage(sum(stat.st_size for _, _, stat in stored), len(stored))

    def evict_to(self, max_size: int) -> tuple[int, int]:
        """Remove components and rustup-init files, least recently used first, until the total is below
        the low-water mark under `max_size`; (files removed, bytes removed). Manifests stay (small)."""
        stored = [item for item in self.iter_stored() if item[0].kind in _EVICTABLE]
        total = sum(stat.st_size for _, _, stat in stored)  # manifests are not counted: a few MB at most
        if total <= max_size:
            return 0, 0
        target = low_water(max_size)
        removed = removed_bytes = 0
        for _, full, stat in sorted(stored, key=lambda item: item[2].st_mtime):
            if total <= target:
                break
            with contextlib.suppress(FileNotFoundError):
                full.unlink()
                total -= stat.st_size
                removed += 1
                removed_bytes += stat.st_size
        return removed, removed_bytes

    def clean_temp_files(self, older_than: float = 3600.0) -> int:
        removed = 0
        now = time.time()
        for temp in self.tmp_dir.glob("*.part"):
            with contextlib.suppress(OSError):
                if now - temp.stat().st_mtime > older_than:
                    temp.unlink()
                    removed += 1
        return removed
