"""Advisory exposure: which clients were already served a version that an advisory affects.

Computed from the audit trail whenever the advisory database is (re)loaded: the distinct (crate,
version, client) triples served within audit.retention, looked up against the advisories of each crate.
The triples come from this replica's `audit.sqlite` and, in a fleet (storage.backend s3), from the other
replicas' hourly audit objects in the bucket (read as `cratemirror audit` reads them, with its bounds;
only the records of crates that have advisories are kept). The result feeds
`cratemirror_advisory_exposure{advisory}`, the status page, and one warning per advisory (once for the
whole mirror: the advisories already warned about are kept in the store, shared by the workers and
across restarts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

from cratemirror.cache.audit import SERVED, AuditRecord, bucket_records, replica_id, served_clients
from cratemirror.fleet.storage import SharedStorage
from cratemirror.policy.advisories import AdvisoryDb
from cratemirror.policy.rules import Rules
from cratemirror.versions import RequirementError, parse_version

WARNED_KEY = "advisory-exposure-warned"
MAX_WARNED = 10_000

Served = tuple[str, str, str]  # (crate, version, who)


def served_here(cache_dir: Path, since: float) -> set[Served]:
    """What this replica served from `since` on (its own audit file)."""
    return set(served_clients(cache_dir, since))


async def served_in_fleet(
    shared: SharedStorage, cache_dir: Path, since: float, db: AdvisoryDb
) -> set[Served]:
    """What the other replicas served from `since` on, of crates the database has advisories for."""
    own = await asyncio.to_thread(replica_id, cache_dir, False)

    def keep(record: AuditRecord) -> bool:
        return record.result == SERVED and bool(db.for_crate(record.crate))

    found: set[Served] = set()
    async for records in bucket_records(shared, since, own, keep):
        found.update((record.crate, record.version, record.who) for record in records)
    return found


def exposure(db: AdvisoryDb, rules: Rules, served: Iterable[Served]) -> dict[str, set[str]]:
    """advisory id -> the clients served a version it affects (advisories the rules act on only)."""
    exposed: dict[str, set[str]] = {}
    for crate, version, who in served:
        candidates = db.for_crate(crate)
        if not candidates:
            continue
        try:
            parsed = parse_version(version)
        except RequirementError:
            continue
        for advisory in candidates:
            if rules.acts_on(advisory) and advisory.affects(parsed):
                exposed.setdefault(advisory.id, set()).add(who)
    return exposed
