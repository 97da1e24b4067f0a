"""The audit trail: who took which crate version, when, and with what result.

One `AuditTrail` per worker process. The hot path (`record`) is one update of an in-memory dict, where
downloads alike (same version, result and client) add to one entry's count; a background task moves the
entries (a row each: first and last time, count) into `audit.sqlite` in the cache dir (SQLite in WAL
mode, shared by the workers, one transaction per batch, in a thread so the event loop never waits on
the disk), drops records older than `audit.retention`, and with a shared store (storage.backend: s3)
uploads each hour's records as one object, `audit/<replica>/<hour>.jsonl.gz`, so one query sees the
fleet.

A committed batch survives a kill -9 (WAL: the commit is in the log before it returns); what waits in
memory is at most FLUSH_SECONDS old. Records read back (from the file or the bucket) are input like
any other: each is parsed into an `AuditRecord` with bounded fields, and anything else is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from cratemirror.fleet.storage import SharedStorage
from cratemirror.names import is_crate_version

log = logging.getLogger("cratemirror.audit")

AUDIT_FILE = "audit.sqlite"
REPLICA_FILE = "replica-id"
FLUSH_SECONDS = 1.0  # the longest a record waits in memory
BATCH = 512  # this many different records waiting are flushed at once (a short hold of the GIL)
MAX_PENDING = 200_000  # beyond this (the disk is stuck) records are dropped and counted, never the server
PRUNE_SECONDS = 3600.0
REOPEN_SECONDS = 10.0  # a file that could not be opened (a full disk) is tried again this often
UPLOAD_SECONDS = 60.0  # a replica's current hour goes to the bucket this often (and at shutdown)
HOUR = 3600
MAX_OBJECT_BYTES = 64 * 1024 * 1024  # one hour's gzipped object, read back
MAX_OBJECT_LINES = 2_000_000
MAX_LINE = 4096
MAX_DECOMPRESSED = 512 * 1024 * 1024
MAX_WHO = 200
MAX_RULE = 100
MAX_ROWS = 5_000_000  # one query reads at most this many records
MAX_COUNT = 1_000_000_000

SERVED = "served"
BLOCKED = "blocked"
NOT_FOUND = "not-found"
FAILED = "failed"
RESULTS = frozenset({SERVED, BLOCKED, NOT_FOUND, FAILED})

REPLICA_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_REGISTRY_RE = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?")
_RULE_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_WHO_RE = re.compile(r"[\x21-\x7e]{1,200}")  # a token name or an address: printable, no spaces


@dataclass(frozen=True, slots=True)
class AuditRecord:
    at: float  # wall clock
    registry: str
    crate: str  # as requested, lowercased
    version: str
    result: str  # served | blocked | not-found | failed
    rule: str  # the policy rule of a refusal ("" otherwise)
    who: str  # the token's name, or the client address
    count: int  # downloads alike (same version, result and client) within one flush, from `at` to `last`
    last: float

    def as_json(self) -> dict[str, object]:
        return {
            "at": self.at, "registry": self.registry, "crate": self.crate, "version": self.version,
            "result": self.result, "rule": self.rule, "who": self.who, "count": self.count,
            "last": self.last,
        }  # fmt: skip


def parse_record(value: object, now: float | None = None) -> AuditRecord | None:
    """A record from outside the process (a row, a bucket line), validated; None if it is not one.
    Records written before counts were kept (7 fields) are one download each."""
    count: object = 1
    last: object = None
    if isinstance(value, tuple | list) and len(value) in (7, 9):
        at, registry, crate, version, result, rule, who = value[:7]
        if len(value) == 9:
            count, last = value[7:]
    elif isinstance(value, dict):
        at, registry, crate, version, result, rule, who = (
            value.get(key) for key in ("at", "registry", "crate", "version", "result", "rule", "who")
        )
        count, last = value.get("count", 1), value.get("last")
    else:
        return None
    latest = (now if now is not None else time.time()) + 86400
    if not _is_time(at) or not 0 <= at <= latest:  # NaN fails too
        return None
    if last is None:
        last = at
    if not _is_time(last) or not at <= last <= latest:
        return None
    if type(count) is not int or not 1 <= count <= MAX_COUNT:
        return None
    if result not in RESULTS or not is_crate_version(crate, version):
        return None
    if not isinstance(registry, str) or not _REGISTRY_RE.fullmatch(registry):
        return None
    if not isinstance(rule, str) or (rule and not _RULE_RE.fullmatch(rule)):
        return None
    if not isinstance(who, str) or not _WHO_RE.fullmatch(who):
        return None
    return AuditRecord(
        float(at), registry, str(crate).lower(), str(version), str(result), rule, who, count, float(last)
    )


def _is_time(value: object) -> TypeGuard[float]:
    return type(value) is float or (type(value) is int)


@dataclass(slots=True)
class Seen:
    """Downloads alike waiting for the writer: when the first and the last were, and how many."""

    first: float
    last: float
    count: int


# (registry, crate, version, result, rule, who) -> Seen
Pending = dict[tuple[str, str, str, str, str, str], Seen]


def merge_pending(into: Pending, more: Pending) -> None:
    for key, seen in more.items():
        entry = into.get(key)
        if entry is None:
            into[key] = seen
        else:
            entry.first, entry.last = min(entry.first, seen.first), max(entry.last, seen.last)
            entry.count += seen.count


# --- the file ------------------------------------------------------------------------------------


class AuditDb:
    """audit.sqlite: one row per record; WAL, so workers append side by side and readers never block."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        self._db = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        if not readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a crash of the process
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS records (
                    at REAL NOT NULL, registry TEXT NOT NULL, crate TEXT NOT NULL, version TEXT NOT NULL,
                    result TEXT NOT NULL, rule TEXT NOT NULL, who TEXT NOT NULL,
                    count INTEGER NOT NULL DEFAULT 1, last REAL);
                CREATE INDEX IF NOT EXISTS records_at ON records(at);
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                """
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(records)")}
            if "count" not in columns:  # a file from before counts were kept: one download a row
                with contextlib.suppress(sqlite3.OperationalError):  # another worker added them first
                    self._db.execute("ALTER TABLE records ADD COLUMN count INTEGER NOT NULL DEFAULT 1")
                    self._db.execute("ALTER TABLE records ADD COLUMN last REAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(self, batch: Iterable[object]) -> int:
        now = time.time()
        rows = []
        for item in batch:
            record = parse_record(item, now)
            if record is not None:
                rows.append((record.at, record.registry, record.crate, record.version, record.result,
                             record.rule, record.who, record.count, record.last))  # fmt: skip
        return self._insert(rows)

    def append_own(self, batch: Pending) -> int:
        """The trail's own records: their time, registry, result and rule are this process's values and
        `who` a token name or address, so only what came from the request is checked again (crate and
        version, as at the edge) and every length bounded. Reading back validates everything."""
        rows = [
            (seen.first, registry, crate.lower(), version, result, rule, who, seen.count, seen.last)
            for (registry, crate, version, result, rule, who), seen in batch.items()
            if is_crate_version(crate, version) and len(who) <= MAX_WHO and len(rule) <= MAX_RULE
        ]
        return self._insert(rows)

    def _insert(self, rows: list[tuple[float, str, str, str, str, str, str, int, float]]) -> int:
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return len(rows)

    def prune(self, before: float) -> int:
        with self._lock:
            cursor = self._db.execute("DELETE FROM records WHERE at < ?", (before,))
            return cursor.rowcount

    def select(
        self, since: float = 0.0, until: float | None = None, limit: int = MAX_ROWS
    ) -> Iterator[AuditRecord]:
        """Records from `since` (up to `until`), oldest first, each validated on the way out. (One index,
        on the time: each more would cost every append; the tools filter by crate as they read.)"""
        sql = (
            "SELECT at, registry, crate, version, result, rule, who, count, coalesce(last, at)"
            " FROM records WHERE at >= ?"
        )
        args: list[object] = [since]
        if until is not None:
            sql += " AND at < ?"
            args.append(until)
        sql += " ORDER BY at LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        now = time.time()
        for row in rows:
            record = parse_record(row, now)
            if record is not None:
                yield record

    def served(self, since: float) -> list[tuple[str, str, str]]:
        """Distinct (crate, version, who) served from `since` on, unvalidated (see served_clients)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT crate, version, who FROM records WHERE result = ? AND at >= ? LIMIT ?",
                (SERVED, since, MAX_ROWS),
            ).fetchall()
        return [(str(crate), str(version), str(who)) for crate, version, who in rows]

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def replica_id(cache_dir: Path, create: bool = True) -> str | None:
    """This cache dir's name in the bucket: made once (random), kept in `replica-id`."""
    path = cache_dir / REPLICA_FILE
    with contextlib.suppress(OSError):
        text = path.read_text(encoding="ascii").strip()
        if REPLICA_RE.fullmatch(text):
            return text
    if not create:
        return None
    made = secrets.token_hex(8)
    temp = cache_dir / f"{REPLICA_FILE}.{os.getpid()}.tmp"
    temp.write_text(made + "\n", encoding="ascii")
    with contextlib.suppress(FileExistsError):
        os.link(temp, path)  # the first worker's name wins; the others read it
    temp.unlink(missing_ok=True)
    text = path.read_text(encoding="ascii").strip()
    return text if REPLICA_RE.fullmatch(text) else None


def encode_hour(records: Iterable[AuditRecord]) -> bytes:
    lines = (json.dumps(record.as_json(), separators=(",", ":")) for record in records)
    return gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=6)


def decode_hour(data: bytes, now: float | None = None) -> Iterator[AuditRecord]:
    """One hour object from the bucket, bounded: compressed size, decompressed size (a gzip bomb stops
    at MAX_DECOMPRESSED), line length (a longer line is skipped, never held whole) and line count."""
    if len(data) > MAX_OBJECT_BYTES:
        return
    read = 0
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            for _ in range(MAX_OBJECT_LINES):
                line = stream.readline(MAX_LINE + 1)
                if not line:
                    return
                read += len(line)
                if len(line) > MAX_LINE:  # longer than allowed: skip to its end, never holding it whole
                    while not line.endswith(b"\n"):
                        line = stream.readline(MAX_LINE + 1)
                        read += len(line)
                        if not line or read > MAX_DECOMPRESSED:
                            return
                    continue
                if read > MAX_DECOMPRESSED:
                    return
                try:
                    value = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                record = parse_record(value, now)
                if record is not None:
                    yield record
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error):
        return


async def bucket_records(
    shared: SharedStorage,
    since: float,
    skip: str | None,
    keep: Callable[[AuditRecord], bool] | None = None,
    limit: int = MAX_ROWS,
) -> AsyncIterator[list[AuditRecord]]:
    """The records from `since` on in the replicas' hourly objects in the bucket, an object at a time
    (those `keep` accepts), except replica `skip`'s (the caller's own: its file is newer). Each object
    is authenticated by the store and decoded (bounded) off the event loop; at most `limit` records are
    read in all (`audit query`, `audit impact` and the exposure gauge alike)."""
    read = 0
    objects = [item async for item in shared.iter_audit(int(since // HOUR))]
    for replica, hour in objects:
        if replica == skip:
            continue
        body = await shared.get_audit(replica, hour, MAX_OBJECT_BYTES)
        if body is None:
            continue
        taken, count = await asyncio.to_thread(_take, body, since, keep, limit - read)
        read += count
        if taken:
            yield taken
        if read >= limit:
            return


def _take(
    body: bytes, since: float, keep: Callable[[AuditRecord], bool] | None, room: int
) -> tuple[list[AuditRecord], int]:
    """(the records from `since` on that `keep` accepts, how many were read from `since` on)."""
    taken: list[AuditRecord] = []
    count = 0
    for record in decode_hour(body):
        if record.at < since:
            continue
        count += 1
        if keep is None or keep(record):
            taken.append(record)
        if count >= room:
            break
    return taken, count


# --- the recorder --------------------------------------------------------------------------------


class AuditTrail:
    """Records downloads and refusals; `retention` 0 turns it off (record() then does nothing)."""

    def __init__(self, cache_dir: Path, retention: float, shared: SharedStorage | None = None) -> None:
        self.cache_dir = cache_dir
        self.retention = retention
        self.enabled = retention > 0
        self.shared = shared
        # Downloads alike within one flush are one entry with a count: a CI fleet asks the same
        # versions over and over, so the writer (SQLite, a thread that holds the GIL while it binds rows)
        # handles hundreds of rows a second, not thousands (one row a download cost hits' p99 1.4x).
        self.pending: Pending = {}
        self.dropped = 0
        self.db: AuditDb | None = None
        self.replica: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pruned_at: float | None = None  # pruned at the first round, then every PRUNE_SECONDS
        self._uploaded_at: float | None = None
        self._opened_at = 0.0

    def record(self, registry: str, crate: str, version: str, result: str, rule: str, who: str) -> None:
        """The hot path: one dict update (the background task validates and writes it)."""
        if not self.enabled:
            return
        now = time.time()
        key = (registry, crate, version, result, rule, who)
        entry = self.pending.get(key)
        if entry is not None:
            entry.last = now
            entry.count += 1
            return
        pending = self.pending
        if len(pending) >= MAX_PENDING:
            self.dropped += 1
            return
        pending[key] = Seen(now, now, 1)
        if len(pending) == BATCH:
            self._wake.set()

    async def start(self) -> None:
        if not self.enabled:
            return
        await self._open()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _open(self) -> bool:
        """Open the file (and learn the replica's name); a disk that refuses is retried later, and the
        records wait in memory meanwhile (bounded by MAX_PENDING)."""
        self._opened_at = time.monotonic()
        try:
            self.db = await asyncio.to_thread(AuditDb, self.cache_dir / AUDIT_FILE)
            if self.shared is not None:
                self.replica = await asyncio.to_thread(replica_id, self.cache_dir)
        except (OSError, sqlite3.Error) as exc:
            log.warning(
                "audit: cannot open %s (%s): records are kept in memory and the file is retried",
                self.cache_dir / AUDIT_FILE, exc,
            )  # fmt: skip
            return False
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.db is None and self.pending and self.enabled:
            await self._open()
        if self.db is not None:
            await self.flush()
            with contextlib.suppress(Exception):
                await self.upload(final=True)
            self.db.close()
            self.db = None

    async def flush(self) -> int:
        """Write what is pending; records stay pending if the disk refuses (and are retried)."""
        if self.db is None or not self.pending:
            return 0
        batch, self.pending = self.pending, {}
        try:
            return await asyncio.to_thread(self.db.append_own, batch)
        except (OSError, sqlite3.Error) as exc:
            log.warning("audit: could not write %d records (kept in memory, retried): %s", len(batch), exc)
            merge_pending(batch, self.pending)
            self.pending = batch
            return 0

    async def prune(self) -> int:
        if self.db is None:
            return 0
        return await asyncio.to_thread(self.db.prune, time.time() - self.retention)

    async def upload(self, final: bool = False) -> int:
        """Each hour not yet uploaded in full, and the current one, as one object per replica and hour."""
        if self.db is None or self.shared is None or self.replica is None:
            return 0
        now = time.time()
        current = int(now // HOUR)
        done = await asyncio.to_thread(self.db.get_meta, "uploaded-through")
        first = int(done) if done and done.isdigit() else int((now - self.retention) // HOUR)
        first = max(first, int((now - self.retention) // HOUR), current - 24 * 400)
        uploaded = 0
        for hour in range(first, current + 1):
            records = await asyncio.to_thread(self._hour_records, hour)
            if not records:
                continue
            body = await asyncio.to_thread(encode_hour, records)
            await self.shared.put_audit(self.replica, hour, body)
            uploaded += 1
        await asyncio.to_thread(self.db.set_meta, "uploaded-through", str(current))
        return uploaded

    def _hour_records(self, hour: int) -> list[AuditRecord]:
        return list(self.db.select(hour * HOUR, (hour + 1) * HOUR)) if self.db is not None else []

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            self._wake.clear()
            too_soon = time.monotonic() - self._opened_at < REOPEN_SECONDS
            if self.db is None and (too_soon or not await self._open()):
                continue
            await self.flush()
            if self.dropped:
                log.warning("audit: %d records dropped (the audit file could not keep up)", self.dropped)
                self.dropped = 0
            now = time.monotonic()
            try:
                if self._pruned_at is None or now - self._pruned_at >= PRUNE_SECONDS:
                    self._pruned_at = now
                    removed = await self.prune()
                    if removed:
                        log.info("audit: dropped %d records older than audit.retention", removed)
                due = self._uploaded_at is None or now - self._uploaded_at >= UPLOAD_SECONDS
                if self.shared is not None and due:
                    self._uploaded_at = now
                    await self.upload()
            except Exception as exc:  # the bucket or the disk failing must not end the recording
                log.warning("audit: %s", exc)


def served_clients(cache_dir: Path, since: float) -> Iterator[tuple[str, str, str]]:
    """(crate, version, who) of every distinct download served from `since` on, read from this cache
    dir's audit file (none if there is no file yet); each row validated like any record."""
    path = cache_dir / AUDIT_FILE
    if not path.is_file():
        return
    db = AuditDb(path, readonly=True)
    try:
        rows = db.served(since)
    finally:
        db.close()
    now = time.time()
    for crate, version, who in rows:
        record = parse_record((now, "crates-io", crate, version, SERVED, "", who), now)
        if record is not None:
            yield record.crate, record.version, record.who
