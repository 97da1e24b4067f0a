"""The on-disk cache.

Layout under `cache.dir`:
  meta/                diskcache: index files (body + validators) and the upstream's config
  crates.sqlite        the crate ledger: checksum, size, last use per crate, and running totals (ledger.py)
  budgets.sqlite       per-client unknown-name budgets shared by the worker processes (cache/ratelimit.py)
  crates/<name>/<name>-<version>.crate   verified tarballs, served with sendfile
  tmp/<pid>-<random>.part                fills in progress (same filesystem, so rename is atomic)
  locks/<key hash>.lock                  flock files that coalesce fills across worker processes
  locks/evict.lock                       one eviction at a time (never one of the fill stripes)

Every path is built from validated names (see names.py), never from raw request text.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import diskcache

from cratemirror.fleet.storage.ledger import STORED, Ledger, LedgerRow
from cratemirror.fleet.storage.locks import EVICT_LOCK, KeyLocks, flocked, try_flock
from cratemirror.keys import CRATE_PREFIX, INDEX_PREFIX, crate_key, index_key
from cratemirror.names import CrateName, CrateVersion

log = logging.getLogger("cratemirror.store")
# CRATE_PREFIX keys: crate checksums lived in diskcache before the ledger (migrated once).

HASH_CHUNK = 1024 * 1024
CRATE_BYTES_KEY = "stats:crate_bytes"
LEDGER_FILE = "crates.sqlite"
RENAME_ATTEMPTS = 3
_LIBC = ctypes.CDLL(None, use_errno=True)
GENERATION_FILE = "index-generation"


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
        self.key_locks = KeyLocks(self.locks_dir)
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
        try:
            self.ledger = Ledger(root / LEDGER_FILE, migrate=self._old_crate_rows)
        except (sqlite3.Error, OSError) as exc:
            self.degraded = self.degraded or f"crate ledger {root / LEDGER_FILE} is unusable ({exc})"
            log.error("%s", self.degraded)
            self.ledger = Ledger(Path(tempfile.mkdtemp(prefix="cratemirror-ledger-")) / LEDGER_FILE)

    def close(self) -> None:
        self.ledger.close()
        self.meta.close()

    def _old_crate_rows(self) -> list[LedgerRow]:
        """A cache written before the ledger kept crate checksums in diskcache: carried over once, for
        the files still present (the one start-up that walks them), and dropped from diskcache."""
        rows: list[LedgerRow] = []
        keys = self.meta._sql(
            "SELECT key FROM Cache WHERE key >= ? AND key < ?", (CRATE_PREFIX, _prefix_end(CRATE_PREFIX))
        ).fetchall()
        for (key,) in keys:
            value: Any = self.meta.get(key)
            if isinstance(value, CrateMeta):
                with contextlib.suppress(OSError):
                    stat = self.crate_path(value.name, value.version).stat()
                    last_used = max(value.fetched_at, stat.st_mtime)
                    rows.append(
                        LedgerRow(
                            value.name,
                            value.version,
                            value.sha256,
                            stat.st_size,
                            value.fetched_at,
                            last_used,
                            STORED,
                        )
                    )
            self.meta.delete(key)
        self.meta.delete(CRATE_BYTES_KEY)
        return rows

    # --- index files -------------------------------------------------------------------------

    def get_index(self, lower_name: str) -> IndexEntry | None:
        value: Any = self.meta.get(index_key(lower_name))
        return value if isinstance(value, IndexEntry) else None

    def put_index(self, lower_name: str, entry: IndexEntry, expire: float | None = None) -> None:
        """`expire`: seconds after which the entry may be culled (remembered 404s, so junk names
        cannot grow the metadata without bound)."""
        self.meta.set(index_key(lower_name), entry, expire=expire)

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
        row = self.ledger.get(name, version)
        return None if row is None else CrateMeta(row.name, row.version, row.sha256, row.size, row.fetched_at)

    def record_crate(self, meta: CrateMeta) -> None:
        """The checksum of a file already in place (adopted after a crash)."""
        self.ledger.record(meta.name, meta.version, meta.sha256, meta.size, meta.fetched_at)

    def touch_crate(self, name: str, version: str, at: float | None = None) -> None:
        """Recency for least-recently-used eviction (callers do it at most hourly per crate)."""
        self.ledger.touch(name, version, at)

    def new_temp_file(self) -> Path:
        return self.tmp_dir / f"{os.getpid()}-{os.urandom(8).hex()}.part"

    def commit_crate(self, temp: Path, meta: CrateMeta) -> Path:
        """Move a verified, fsynced temp file into place. The ledger row first (PENDING, uncounted),
        then the rename, then the row becomes STORED and counted: a crash anywhere in between leaves a
        row that start-up settles from whether the file is there (it is verified if it is)."""
        final = self.crate_path(meta.name, meta.version)
        self.ledger.begin_commit(meta.name, meta.version, meta.sha256, meta.size, meta.fetched_at)
        for attempt in range(RENAME_ATTEMPTS):
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(temp, final)
                break
            except FileNotFoundError:
                # An eviction removed the (then empty) crate folder between mkdir and rename.
                if attempt + 1 >= RENAME_ATTEMPTS or not temp.exists():
                    raise
        _fsync_dir(final.parent)
        self.ledger.finish_commit(meta.name, meta.version)
        return final

    def commit_crates(self, batch: list[tuple[Path, CrateMeta]]) -> None:
        """`commit_crate` for many verified temp files (the server's group commit, and import): two
        ledger transactions and two filesystem syncs for the whole batch instead of several fsyncs
        and writes per crate. The temp files need not be fsynced: one syncfs makes their bytes
        durable before any rename."""
        if not batch:
            return
        self.ledger.begin_commits(
            (meta.name, meta.version, meta.sha256, meta.size, meta.fetched_at) for _, meta in batch
        )
        _sync_filesystem(self.tmp_dir, [temp for temp, _ in batch])
        folders: set[Path] = set()
        for temp, meta in batch:
            final = self.crate_path(meta.name, meta.version)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
            folders.add(final.parent)
        _sync_filesystem(self.crates_dir, list(folders))
        self.ledger.finish_commits((meta.name, meta.version) for _, meta in batch)

    def crate_bytes(self) -> int:
        """Bytes of stored crates: a running total kept by the ledger, shared by every process."""
        return self.ledger.totals()[0]

    def remove_crate(self, name: str, version: str) -> None:
        """The file, then its row (a crash between leaves a row without a file: a plain miss)."""
        path = self.crate_path(name, version)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.ledger.delete(name, version)
        remove_empty_dir(path.parent)

    def evict_rows(self, rows: list[LedgerRow]) -> tuple[list[LedgerRow], list[LedgerRow]]:
        """Remove these crates as eviction does, safe beside running fills: (removed, left in place).
        The rows leave the totals in one transaction; each file goes under its crate's fill lock, only
        tried (a crate being filled stays); the rows are dropped in one transaction."""
        marked = self.ledger.mark_evicting(rows)
        gone: list[LedgerRow] = []
        kept: list[LedgerRow] = []
        for row in marked:
            with self.try_lock_crate(row.name, row.version) as held:
                # Under the crate's lock no fill is committing it; a fill that did so before we got here
                # has made the row STORED again, and its new file must stay.
                if not held or not self.ledger.is_evicting(row.name, row.version):
                    kept.append(row)
                    continue
                path = self.crate_path(row.name, row.version)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            remove_empty_dir(path.parent)
            gone.append(row)
        self.ledger.finish_eviction(gone, kept)
        return gone, kept

    def settle(self) -> int:
        """Finish the commits and evictions that dead processes left half done (start-up; cheap)."""
        return self.ledger.settle(
            lambda name, version: self.crate_path(name, version).exists(), _process_alive
        )

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
        """An exclusive lock on `key`, shared by every worker process using this cache dir."""
        async with self.key_locks.lock(key):
            yield

    @contextlib.asynccontextmanager
    async def eviction_lock(self) -> AsyncIterator[None]:
        """One eviction (server or prune) at a time, on a lock file of its own: no fill waits on it."""
        async with flocked(self.locks_dir / EVICT_LOCK, "eviction"):
            yield

    def eviction_running(self) -> bool:
        """Whether another process holds the eviction lock now (the server then leaves it be)."""
        with try_flock(self.locks_dir / EVICT_LOCK) as held:
            return not held

    @contextlib.contextmanager
    def try_lock_crate(self, name: str, version: str) -> Iterator[bool]:
        """The fill lock of one crate if it is free at once (eviction skips a crate being filled);
        held only for the few microseconds of an unlink, so a miss on the same stripe barely waits."""
        with self.key_locks.try_lock(crate_key(name, version)) as held:
            yield held

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
        """Every *.crate file under crates/, a folder at a time (folders may vanish meanwhile)."""
        with contextlib.suppress(FileNotFoundError), os.scandir(self.crates_dir) as folders:
            for folder in folders:
                if not folder.is_dir(follow_symlinks=False):
                    continue
                with contextlib.suppress(FileNotFoundError), os.scandir(folder.path) as files:
                    for entry in files:
                        if entry.name.endswith(".crate"):
                            yield Path(entry.path)

    def usage(self) -> dict[str, tuple[int, int]]:
        """(bytes, entries) by kind from running totals: O(1) per scrape, never a walk or a count."""
        entries = self.index_entries()
        # The metadata database's own pages are no cached index file: an empty cache holds 0 bytes.
        return {"crate": self.ledger.totals(), "index": (int(self.meta.volume()) if entries else 0, entries)}

    def index_entries(self) -> int:
        """Index files stored: diskcache keeps the key count itself; subtract the few other keys."""
        others = self.meta._sql(
            "SELECT COUNT(*) FROM Cache WHERE key < ? OR key >= ?", (INDEX_PREFIX, _prefix_end(INDEX_PREFIX))
        ).fetchone()[0]
        return len(self.meta) - int(others)

    def iter_crate_metas(self) -> Iterator[CrateMeta]:
        """Every crate with a recorded checksum (its file present or not), by name, a page at a time."""
        for row in self.ledger.iter_rows():
            yield CrateMeta(row.name, row.version, row.sha256, row.size, row.fetched_at)

    def iter_ledger(self) -> Iterator[LedgerRow]:
        return self.ledger.iter_rows()


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


def remove_empty_dir(directory: Path) -> None:
    """Drop a crate folder its last file left (a scan or `ls` never wades through empty folders)."""
    with contextlib.suppress(OSError):  # not empty (another version), or already gone
        directory.rmdir()


def _sync_filesystem(anchor: Path, fallback: list[Path]) -> None:
    """syncfs(2) on the cache's filesystem (one call however many files); where it is missing, an
    fsync of each path in `fallback` (files or folders)."""
    syncfs = getattr(_LIBC, "syncfs", None)
    if syncfs is not None:
        fd = os.open(anchor, os.O_RDONLY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in fallback:
        _fsync_dir(path)  # an O_RDONLY fsync works for files and folders alike


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
