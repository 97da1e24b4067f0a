"""The on-disk cache.

Layout under `cache.dir`:
  meta/                diskcache: index files (body + validators) and per-crate metadata
  crates/<name>/<name>-<version>.crate   verified tarballs, served with sendfile
  tmp/<pid>-<random>.part                fills in progress (same filesystem, so rename is atomic)
  locks/<key hash>.lock                  flock files that coalesce fills across worker processes

Every path is built from validated names (see names.py), never from raw request text.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import diskcache

from cratemirror.names import CrateName, CrateVersion

# Waiting on another process's flock blocks a thread; these threads do nothing else.
log = logging.getLogger("cratemirror.store")

LOCK_STRIPES = 4096
HASH_CHUNK = 1024 * 1024
INDEX_PREFIX = "index:"
CRATE_PREFIX = "crate:"
CRATE_BYTES_KEY = "stats:crate_bytes"
GENERATION_FILE = "index-generation"
_LOCK_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="cratemirror-lock")


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One cached sparse-index file, or a remembered upstream 404 (status 404, empty body)."""

    status: int
    body: bytes
    etag: str  # ours: derived from the body, so it changes exactly when the bytes do
    last_modified: str  # HTTP date
    checked_at: float  # when upstream last confirmed it (wall clock)
    upstream_etag: str | None = None
    upstream_last_modified: str | None = None


@dataclass(frozen=True, slots=True)
class CrateMeta:
    name: str
    version: str
    sha256: str
    size: int
    fetched_at: float


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.crates_dir = root / "crates"
        self.tmp_dir = root / "tmp"
        self.locks_dir = root / "locks"
        self._generation_path = str(root / GENERATION_FILE)  # stat'ed per index request: built once
        for directory in (root, self.crates_dir, self.tmp_dir, self.locks_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.degraded: str | None = None
        try:
            # Small SQLite database; large index bodies spill to files inside it.
            self.meta = _open_meta(root / "meta")
        except (sqlite3.Error, OSError) as exc:
            # A full or broken disk must not keep the mirror from starting: serve from upstream with
            # throwaway metadata, and say so on /readyz until it is fixed and restarted.
            self.degraded = f"cache metadata in {root / 'meta'} is unusable ({exc}); nothing is stored"
            log.error("%s", self.degraded)
            self.meta = _open_meta(Path(tempfile.mkdtemp(prefix="cratemirror-meta-")))

    def close(self) -> None:
        self.meta.close()

    # --- index files -------------------------------------------------------------------------

    def get_index(self, lower_name: str) -> IndexEntry | None:
        value: Any = self.meta.get(f"{INDEX_PREFIX}{lower_name}")
        return value if isinstance(value, IndexEntry) else None

    def put_index(self, lower_name: str, entry: IndexEntry, expire: float | None = None) -> None:
        """`expire`: seconds after which the entry may be culled (remembered 404s, so junk names
        cannot grow the metadata without bound)."""
        self.meta.set(f"{INDEX_PREFIX}{lower_name}", entry, expire=expire)

    # `cratemirror refresh` changed stored index files behind the workers' backs: each worker compares
    # this file's mtime (one stat, no SQLite) before trusting its in-memory copies.
    def index_generation(self) -> int:
        try:
            return os.stat(self._generation_path).st_mtime_ns
        except OSError:
            return 0

    def bump_index_generation(self) -> None:
        path = Path(self._generation_path)
        # Set explicitly and strictly increasing: the file system's own clock may tick too coarsely.
        stamp = max(time.time_ns(), self.index_generation() + 1)
        path.touch()
        os.utime(path, ns=(stamp, stamp))

    def get_json(self, key: str) -> Any:
        return self.meta.get(f"json:{key}")

    def put_json(self, key: str, value: Any) -> None:
        self.meta.set(f"json:{key}", value)

    # --- crates ------------------------------------------------------------------------------

    def crate_path(self, name: str, version: str) -> Path:
        """The file of a crate version. Validated here as well as at the edges, so no caller can
        build a path outside crates/ from upstream or bundle text (InvalidRequest otherwise)."""
        key = CrateVersion(CrateName(name), version)
        return self.crates_dir / key.crate.name / f"{key.crate.name}-{key.version}.crate"

    def get_crate_meta(self, name: str, version: str) -> CrateMeta | None:
        value: Any = self.meta.get(f"{CRATE_PREFIX}{name}/{version}")
        return value if isinstance(value, CrateMeta) else None

    def record_crate(self, meta: CrateMeta) -> None:
        self.meta.set(f"{CRATE_PREFIX}{meta.name}/{meta.version}", meta)

    def new_temp_file(self) -> Path:
        return self.tmp_dir / f"{os.getpid()}-{os.urandom(8).hex()}.part"

    def commit_crate(self, temp: Path, meta: CrateMeta) -> Path:
        """Move a verified, fsynced temp file into place. Metadata first: a crash in between leaves
        metadata without a file (a plain miss), never a file without its checksum."""
        final = self.crate_path(meta.name, meta.version)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.record_crate(meta)
        os.replace(temp, final)
        _fsync_dir(final.parent)
        self.meta.incr(CRATE_BYTES_KEY, meta.size, default=0)
        return final

    # Running total of crate bytes, shared by all workers (diskcache's incr is atomic across processes);
    # kept by commit_crate and remove_crate, recomputed exactly at start-up.
    def crate_bytes(self) -> int:
        value: Any = self.meta.get(CRATE_BYTES_KEY, 0)
        return int(value)

    def set_crate_bytes(self, total: int) -> None:
        self.meta.set(CRATE_BYTES_KEY, total)

    def remove_crate(self, name: str, version: str) -> None:
        path = self.crate_path(name, version)
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.unlink()
            self.meta.incr(CRATE_BYTES_KEY, -size, default=0)
        self.meta.delete(f"{CRATE_PREFIX}{name}/{version}")

    def clean_stale_temp_files(self) -> int:
        """Remove fills left by processes that no longer run (a crash or kill -9 mid-download)."""
        removed = 0
        for temp in self.tmp_dir.glob("*.part"):
            pid_text = temp.name.split("-", 1)[0]
            if pid_text.isdigit() and _process_alive(int(pid_text)):
                continue
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
                removed += 1
        return removed

    # --- cross-process coalescing ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        """An exclusive flock on `key`, shared by every worker process using this cache dir."""
        # A fixed set of lock files (keys hash onto them) so the directory never grows; two keys that
        # share a stripe only wait for each other, and no code path holds two locks at once.
        stripe = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % LOCK_STRIPES
        path = self.locks_dir / f"{stripe:04x}.lock"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access
        except OSError as exc:
            # A read-only or full cache dir: coalesce within this process only, keep answering.
            log.warning("no cross-process lock for %s: %s", key, exc)
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                await asyncio.get_running_loop().run_in_executor(
                    _LOCK_THREADS, fcntl.flock, fd, fcntl.LOCK_EX
                )
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def writable_problem(self) -> str | None:
        """None when the cache dir accepts writes, else a one-line reason (for /readyz)."""
        if self.degraded:
            return self.degraded
        probe = self.tmp_dir / f"{os.getpid()}-readyz.probe"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"ok")
            probe.unlink()
        except OSError as exc:
            return f"cache dir {self.root} is not writable: {exc.strerror or exc}"
        return None

    def iter_crate_files(self) -> Iterator[Path]:
        yield from self.crates_dir.glob("*/*.crate")

    def measure_crate_bytes(self) -> int:
        """The crate files' total size, walked on disk (slow on a big cache: start-up only, off the loop)."""
        total = 0
        for path in self.iter_crate_files():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def usage(self) -> dict[str, tuple[int, int]]:
        """(bytes, entries) by kind from the shared running total and indexed key counts: a few SQLite
        reads, never a walk over the files, so it can run on every scrape."""
        return {
            "crate": (self.crate_bytes(), self.count_keys(CRATE_PREFIX)),
            "index": (int(self.meta.volume()), self.count_keys(INDEX_PREFIX)),
        }

    def count_keys(self, prefix: str) -> int:
        """Live keys starting with `prefix` (ASCII, ending in ':'). diskcache has no prefix count and
        iterating its keys takes seconds on a big cache; this is a range scan of its key index."""
        rows = self.meta._sql(
            "SELECT COUNT(*) FROM Cache WHERE key >= ? AND key < ?"
            " AND (expire_time IS NULL OR expire_time > ?)",
            (prefix, _prefix_end(prefix), time.time()),
        ).fetchall()
        return int(rows[0][0])

    def iter_crate_metas(self) -> Iterator[CrateMeta]:
        """Every crate with a recorded checksum (its file present or not)."""
        rows = self.meta._sql(
            "SELECT key FROM Cache WHERE key >= ? AND key < ?", (CRATE_PREFIX, _prefix_end(CRATE_PREFIX))
        ).fetchall()
        for (key,) in rows:
            name, _, version = str(key)[len(CRATE_PREFIX) :].partition("/")
            meta = self.get_crate_meta(name, version)
            if meta is not None:
                yield meta


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def sha256_stream(handle: IO[bytes], out: IO[bytes] | None = None) -> tuple[str, int]:
    """sha256 and size of everything readable from `handle`, copying it to `out` on the way."""
    hasher = hashlib.sha256()
    size = 0
    while chunk := handle.read(HASH_CHUNK):
        hasher.update(chunk)
        size += len(chunk)
        if out is not None:
            out.write(chunk)
    return hasher.hexdigest(), size


class DiskTrouble:
    """Remembers the last failed cache write: logged at most once a minute, shown by /readyz."""

    def __init__(self, log_interval: float = 60.0) -> None:
        self.log_interval = log_interval
        self.last_error: str | None = None
        self.last_at = 0.0
        self._logged_at = -log_interval

    def report(self, reason: str) -> None:
        now = time.monotonic()
        self.last_error, self.last_at = reason, now
        if now - self._logged_at >= self.log_interval:
            self._logged_at = now
            log.error(
                "%s (serving from upstream without storing; repeats are not logged for %ds)",
                reason,
                self.log_interval,
            )

    def recent(self, within: float = 60.0) -> str | None:
        if self.last_error is not None and time.monotonic() - self.last_at < within:
            return self.last_error
        return None


def _open_meta(directory: Path) -> diskcache.Cache:
    return diskcache.Cache(str(directory), size_limit=2**40, eviction_policy="none")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
