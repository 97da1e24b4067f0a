"""Advisory exposure: which clients were already served a version that an advisory affects.

Computed from the audit trail whenever the advisory database is (re)loaded: one pass over the distinct
(crate, version, client) triples served within audit.retention, looked up against the advisories of
each crate. The result feeds `cratemirror_advisory_exposure{advisory}`, the status page, and one
warning per advisory (once for the whole mirror: the advisories already warned about are kept in the
store, shared by the workers and across restarts).
"""

from __future__ import annotations

import time
from pathlib import Path

from cratemirror.cache.audit import served_clients
from cratemirror.policy.advisories import AdvisoryDb
from cratemirror.policy.rules import Rules
from cratemirror.versions import RequirementError, parse_version

WARNED_KEY = "advisory-exposure-warned"
MAX_WARNED = 10_000


def exposure(db: AdvisoryDb, rules: Rules, cache_dir: Path, retention: float) -> dict[str, set[str]]:
    """advisory id -> the clients served a version it affects (advisories the rules act on only)."""
    if retention <= 0 or not db.count:
        return {}
    exposed: dict[str, set[str]] = {}
    for crate, version, who in served_clients(cache_dir, time.time() - retention):
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
