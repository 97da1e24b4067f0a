"""The audit trail in one worker: what a download records (served, blocked, not found), who (the token's
name, else the address), that records are validated when written and read back, and that
audit.retention drops what is older."""

from __future__ import annotations

import gzip
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from cratemirror.cache.audit import AUDIT_FILE, AuditDb, AuditTrail, decode_hour, encode_hour, parse_record
from cratemirror.config.schema import RegistryConfig
from cratemirror.http.audit import AUDIT
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry


def records_of(cache: Path, registry: bool = False) -> list[tuple[str | int, ...]]:
    """(registry,) crate, version, result, rule, who and count of each record, oldest first."""
    db = AuditDb(cache / AUDIT_FILE, readonly=True)
    try:
        return [
            ((r.registry,) if registry else ()) + (r.crate, r.version, r.result, r.rule, r.who, r.count)
            for r in db.select()
        ]
    finally:
        db.close()


async def flushed(mirror: TestClient[Any, Any]) -> None:
    await mirror.app[AUDIT].flush()


async def test_downloads_and_refusals_are_recorded_with_the_client(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    registry.add_crate("serde", "1.0.0")
    registry.add_crate("denied", "0.1.0")
    mirror = await mirror_factory(
        policy__mode="enforce", policy__deny=("denied",),
        registries={"corp": RegistryConfig(index_url=registry.index_url)},
    )  # fmt: skip
    for path in (
        "/api/v1/crates/serde/1.0.0/download",  # a miss
        "/api/v1/crates/serde/1.0.0/download",  # a hit
        "/api/v1/crates/denied/0.1.0/download",  # refused by the policy
        "/api/v1/crates/serde/9.9.9/download",  # no such version
        "/api/v1/crates/-bad-/1.0.0/download",  # 400: nothing to record
        "/registries/corp/api/v1/crates/serde/1.0.0/download",  # another registry
    ):
        async with mirror.get(path) as response:
            await response.read()
    async with mirror.head("/api/v1/crates/serde/1.0.0/download") as response:
        assert response.status == 200  # a HEAD takes nothing: not recorded
    await flushed(mirror)
    assert records_of(tmp_path / "cache", registry=True) == [
        ("crates-io", "serde", "1.0.0", "served", "", "127.0.0.1", 2),  # the miss and the hit
        ("crates-io", "denied", "0.1.0", "blocked", "deny", "127.0.0.1", 1),
        ("crates-io", "serde", "9.9.9", "not-found", "", "127.0.0.1", 1),
        ("corp", "serde", "1.0.0", "served", "", "127.0.0.1", 1),
    ]


async def test_retention_zero_records_nothing(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    registry.add_crate("serde", "1.0.0")
    mirror = await mirror_factory(audit__retention=0)
    async with mirror.get("/api/v1/crates/serde/1.0.0/download") as response:
        assert response.status == 200
    assert not mirror.app[AUDIT].enabled and not mirror.app[AUDIT].pending
    assert not (tmp_path / "cache" / AUDIT_FILE).exists()


async def test_retention_drops_older_records(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path, retention=3600)
    await trail.start()
    try:
        assert trail.db is not None
        now = time.time()
        trail.db.append([
            (now - 7200, "crates-io", "old", "1.0.0", "served", "", "ci"),
            (now - 60, "crates-io", "new", "1.0.0", "served", "", "ci"),
        ])  # fmt: skip
        assert await trail.prune() == 1
        assert [r.crate for r in trail.db.select()] == ["new"]
    finally:
        await trail.close()


def test_records_from_outside_are_validated() -> None:
    good = {"at": 1.0e9, "registry": "crates-io", "crate": "Serde", "version": "1.0.0", "result": "served",
            "rule": "", "who": "ci-runner"}  # fmt: skip
    record = parse_record(good)
    assert record is not None and record.crate == "serde"
    for key, bad in (
        ("at", float("nan")), ("at", "1"), ("at", 1.0e12), ("crate", "../etc"), ("version", "1"),
        ("result", "stolen"), ("who", "a b"), ("who", "x" * 500), ("rule", "a/b"), ("registry", "A B"),
        ("count", 0), ("count", True), ("count", 2.0), ("count", 10**12), ("last", 1.0e9 - 1),
        ("last", "1"), ("last", float("inf")),
    ):  # fmt: skip
        assert parse_record({**good, key: bad}) is None, (key, bad)
    assert record.count == 1 and record.last == record.at  # written before counts were kept
    counted = parse_record({**good, "count": 3, "last": 1.0e9 + 0.5})
    assert counted is not None and (counted.count, counted.last) == (3, 1.0e9 + 0.5)
    assert parse_record([1, 2]) is None and parse_record("line") is None
    body = encode_hour([record])
    assert list(decode_hour(body)) == [record]
    assert list(decode_hour(b"not gzip")) == []
    line = json.dumps(good).encode()
    long_line = b'{"a": "' + b"x" * 100_000 + b'"}'
    assert list(decode_hour(gzip.compress(long_line + b"\n" + line + b"\n[[[\n" + line))) == [record] * 2


async def test_a_file_that_cannot_be_opened_keeps_records_in_memory(tmp_path: Path) -> None:
    (tmp_path / AUDIT_FILE).mkdir()  # not a database: opening it fails, as on a full or broken disk
    trail = AuditTrail(tmp_path, retention=3600)
    await trail.start()  # the server starts anyway
    try:
        assert trail.db is None
        trail.record("crates-io", "serde", "1.0.0", "served", "", "ci")
        assert await trail.flush() == 0 and len(trail.pending) == 1
        (tmp_path / AUDIT_FILE).rmdir()  # the disk is usable again
    finally:
        await trail.close()  # opens the file and writes what waited
    assert records_of(tmp_path) == [("serde", "1.0.0", "served", "", "ci", 1)]


async def test_downloads_alike_are_one_record_with_a_count(tmp_path: Path) -> None:
    """Within one flush, downloads of the same version with the same result by the same client are one
    row (first and last time, count); anything else is a row of its own, and a name the route would
    have refused never reaches the file."""
    trail = AuditTrail(tmp_path, retention=3600)
    await trail.start()
    try:
        before = time.time()
        for _ in range(3):
            trail.record("crates-io", "Serde", "1.0.0", "served", "", "ci")
        trail.record("crates-io", "serde", "1.0.0", "served", "", "alice")
        trail.record("crates-io", "serde", "1.0.0", "blocked", "cooldown", "ci")
        trail.record("crates-io", "../etc", "1.0.0", "served", "", "ci")
        assert await trail.flush() == 3
        trail.record("crates-io", "Serde", "1.0.0", "served", "", "ci")  # the next flush: a new row
        assert await trail.flush() == 1
        assert trail.db is not None
        first = next(iter(trail.db.select()))
        assert before <= first.at <= first.last <= time.time() and first.count == 3
    finally:
        await trail.close()
    assert records_of(tmp_path) == [
        ("serde", "1.0.0", "served", "", "ci", 3),
        ("serde", "1.0.0", "served", "", "alice", 1),
        ("serde", "1.0.0", "blocked", "cooldown", "ci", 1),
        ("serde", "1.0.0", "served", "", "ci", 1),
    ]


def test_a_file_from_before_counts_is_read_and_extended(tmp_path: Path) -> None:
    """audit.sqlite as the first release wrote it (7 columns): its rows read as one download each, and
    the trail adds the new columns and goes on writing to it."""
    old = sqlite3.connect(tmp_path / AUDIT_FILE)
    old.executescript(
        """
        CREATE TABLE records (at REAL NOT NULL, registry TEXT NOT NULL, crate TEXT NOT NULL,
            version TEXT NOT NULL, result TEXT NOT NULL, rule TEXT NOT NULL, who TEXT NOT NULL);
        CREATE INDEX records_at ON records(at);
        """
    )
    old.execute("INSERT INTO records VALUES (?, 'crates-io', 'old', '1.0.0', 'served', '', 'ci')",
                (time.time() - 60,))  # fmt: skip
    old.commit()
    old.close()
    db = AuditDb(tmp_path / AUDIT_FILE)
    try:
        now = time.time()
        assert db.append([(now, "crates-io", "new", "1.0.0", "served", "", "ci", 4, now)]) == 1
    finally:
        db.close()
    assert records_of(tmp_path) == [
        ("old", "1.0.0", "served", "", "ci", 1),
        ("new", "1.0.0", "served", "", "ci", 4),
    ]
