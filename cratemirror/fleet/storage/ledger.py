"""The crate ledger: one SQLite row per stored crate (checksum, size, last use, state) and running totals.

Least-recently-used order is an index on `last_used`, so eviction reads the oldest rows instead of
walking the files. The totals (bytes, entries) are kept by triggers in the same transaction as the row
change, so they are exact at every moment and after any crash, and reading them is one row.

A row's state makes the two-step operations crash-safe without a walk at start-up:
  STORED   the file is in place and verified; counted in the totals
  PENDING  a commit recorded the row and is renaming its verified file into place; not counted
  EVICTING an eviction is removing the file; not counted
PENDING and EVICTING rows carry the pid doing the work; `settle()` finishes the rows of processes that
are gone (a file present is a verified file, so the row becomes STORED; a file absent drops the row).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

STORED, PENDING, EVICTING = 0, 1, 2
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000  # a migration in another process may hold the write lock for a while
PAGE = 1000  # rows per read when streaming the whole ledger

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS crates (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    fetched_at REAL NOT NULL,
    last_used REAL NOT NULL,
    state INTEGER NOT NULL,
    pid INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;
""",
    f"""
CREATE INDEX IF NOT EXISTS crates_lru ON crates (last_used) WHERE state = {STORED};
""",
    f"""
CREATE INDEX IF NOT EXISTS crates_unsettled ON crates (state) WHERE state != {STORED};
""",
    """
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL,
    entries INTEGER NOT NULL
);
""",
    """
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
""",
    f"""
CREATE TRIGGER IF NOT EXISTS crates_insert AFTER INSERT ON crates WHEN new.state = {STORED} BEGIN
    UPDATE totals SET bytes = bytes + new.size, entries = entries + 1 WHERE id = 0;
END;
""",
    f"""
CREATE TRIGGER IF NOT EXISTS crates_delete AFTER DELETE ON crates WHEN old.state = {STORED} BEGIN
    UPDATE totals SET bytes = bytes - old.size, entries = entries - 1 WHERE id = 0;
END;
""",
    f"""
CREATE TRIGGER IF NOT EXISTS crates_update AFTER UPDATE OF state, size ON crates BEGIN
    UPDATE totals SET
        bytes = bytes - (CASE WHEN old.state = {STORED} THEN old.size ELSE 0 END)
                      + (CASE WHEN new.state = {STORED} THEN new.size ELSE 0 END),
        entries = entries - (old.state = {STORED}) + (new.state = {STORED})
    WHERE id = 0;
END;
""",
)


@dataclass(frozen=True, slots=True)
class LedgerRow:
    name: str
    version: str
    sha256: str
    size: int
    fetched_at: float
    last_used: float
    state: int


_COLUMNS = "name, version, sha256, size, fetched_at, last_used, state"


class Ledger:
    """Thread-safe: each thread gets its own connection (SQLite serialises writers across processes)."""

    def __init__(self, path: Path, migrate: Callable[[], Iterable[LedgerRow]] | None = None) -> None:
        """`migrate`: rows to start a new ledger with (an older cache's crates), read under the lock."""
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")  # one process creates (and migrates); the others wait
            if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                for statement in _SCHEMA:
                    db.execute(statement)
                if migrate is not None:
                    self._insert(db, migrate())
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            # Used only by the thread that opened it; check_same_thread=False lets close() run anywhere.
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a process crash loses nothing
            self._local.db = db
            with self._guard:
                self._connections.append(db)
        return db

    def close(self) -> None:
        with self._guard:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()

    # --- rows --------------------------------------------------------------------------------------

    def get(self, name: str, version: str) -> LedgerRow | None:
        row = (
            self._db()
            .execute(f"SELECT {_COLUMNS} FROM crates WHERE name = ? AND version = ?", (name, version))
            .fetchone()
        )
        return LedgerRow(*row) if row else None

    def begin_commit(self, name: str, version: str, sha256: str, size: int, fetched_at: float) -> None:
        """Step 1 of storing a file: the row, PENDING (uncounted) until `finish_commit`."""
        self._db().execute(
            f"INSERT INTO crates ({_COLUMNS}, pid) VALUES (?, ?, ?, ?, ?, ?, {PENDING}, ?)"
            " ON CONFLICT (name, version) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size,"
            " fetched_at = excluded.fetched_at, last_used = excluded.last_used, state = excluded.state,"
            " pid = excluded.pid",
            (name, version, sha256, size, fetched_at, fetched_at, os.getpid()),
        )

    def begin_commits(self, rows: Iterable[tuple[str, str, str, int, float]]) -> None:
        """`begin_commit` for many (name, version, sha256, size, fetched_at) in one transaction."""
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            for row in rows:
                self.begin_commit(*row)

    def finish_commits(self, keys: Iterable[tuple[str, str]]) -> None:
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            for name, version in keys:
                self.finish_commit(name, version)

    def finish_commit(self, name: str, version: str) -> None:
        self._db().execute(
            f"UPDATE crates SET state = {STORED}, pid = 0"
            f" WHERE name = ? AND version = ? AND state = {PENDING}",
            (name, version),
        )

    def record(self, name: str, version: str, sha256: str, size: int, fetched_at: float) -> None:
        """A row for a file already in place (adopted after a crash): STORED at once."""
        self._db().execute(
            f"INSERT INTO crates ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, {STORED})"
            " ON CONFLICT (name, version) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size,"
            " fetched_at = excluded.fetched_at, state = excluded.state, pid = 0",
            (name, version, sha256, size, fetched_at, fetched_at),
        )

    def delete(self, name: str, version: str) -> None:
        self._db().execute("DELETE FROM crates WHERE name = ? AND version = ?", (name, version))

    def touch(self, name: str, version: str, at: float | None = None) -> None:
        self._db().execute(
            "UPDATE crates SET last_used = ? WHERE name = ? AND version = ?",
            (time.time() if at is None else at, name, version),
        )

    def totals(self) -> tuple[int, int]:
        """(bytes, entries) of STORED crates."""
        row = self._db().execute("SELECT bytes, entries FROM totals WHERE id = 0").fetchone()
        return int(row[0]), int(row[1])

    def iter_rows(self) -> Iterator[LedgerRow]:
        """Every row by name, a page at a time (flat memory however big the cache)."""
        after = ("", "")
        while True:
            rows = (
                self._db()
                .execute(
                    f"SELECT {_COLUMNS} FROM crates WHERE (name, version) > (?, ?)"
                    f" ORDER BY name, version LIMIT {PAGE}",
                    after,
                )
                .fetchall()
            )
            for row in rows:
                yield LedgerRow(*row)
            if len(rows) < PAGE:
                return
            after = (rows[-1][0], rows[-1][1])

    # --- eviction ----------------------------------------------------------------------------------

    def oldest(self, limit: int, skip: int = 0) -> list[LedgerRow]:
        rows = self._db().execute(
            f"SELECT {_COLUMNS} FROM crates WHERE state = {STORED} ORDER BY last_used LIMIT ? OFFSET ?",
            (limit, skip),
        )
        return [LedgerRow(*row) for row in rows]

    def mark_evicting(self, rows: Iterable[LedgerRow]) -> list[LedgerRow]:
        """One transaction: these rows leave the totals; returns those still STORED (now EVICTING)."""
        marked: list[LedgerRow] = []
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            for row in rows:
                cursor = db.execute(
                    f"UPDATE crates SET state = {EVICTING}, pid = ? WHERE name = ? AND version = ?"
                    f" AND state = {STORED}",
                    (os.getpid(), row.name, row.version),
                )
                if cursor.rowcount:
                    marked.append(row)
        return marked

    def is_evicting(self, name: str, version: str) -> bool:
        row = (
            self._db()
            .execute("SELECT state FROM crates WHERE name = ? AND version = ?", (name, version))
            .fetchone()
        )
        return row is not None and row[0] == EVICTING

    def finish_eviction(self, removed: Iterable[LedgerRow], kept: Iterable[LedgerRow]) -> None:
        """One transaction: drop the rows whose files went, put back those that stayed. A row a fill
        has re-committed meanwhile is no longer EVICTING and is left alone."""
        db = self._db()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                f"DELETE FROM crates WHERE name = ? AND version = ? AND state = {EVICTING}",
                [(row.name, row.version) for row in removed],
            )
            db.executemany(
                f"UPDATE crates SET state = {STORED}, pid = 0 WHERE name = ? AND version = ?"
                f" AND state = {EVICTING}",
                [(row.name, row.version) for row in kept],
            )

    # --- start-up --------------------------------------------------------------------------------

    def settle(self, file_exists: Callable[[str, str], bool], alive: Callable[[int], bool]) -> int:
        """Finish what dead processes left half done (at most the fills and one eviction batch they
        had in flight, never a walk of the whole cache). Returns the number of rows settled."""
        db = self._db()
        unsettled = db.execute(f"SELECT name, version, pid FROM crates WHERE state != {STORED}").fetchall()
        settled = 0
        for name, version, pid in unsettled:
            if pid == os.getpid() or alive(pid):
                continue
            if file_exists(name, version):
                db.execute(
                    f"UPDATE crates SET state = {STORED}, pid = 0 WHERE name = ? AND version = ?"
                    f" AND state != {STORED} AND pid = ?",
                    (name, version, pid),
                )
            else:
                db.execute(
                    f"DELETE FROM crates WHERE name = ? AND version = ? AND state != {STORED} AND pid = ?",
                    (name, version, pid),
                )
            settled += 1
        return settled

    @staticmethod
    def _insert(db: sqlite3.Connection, rows: Iterable[LedgerRow]) -> None:
        db.executemany(
            f"INSERT OR IGNORE INTO crates ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, {STORED})",
            [(r.name, r.version, r.sha256, r.size, r.fetched_at, r.last_used) for r in rows],
        )
