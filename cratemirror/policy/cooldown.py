"""The release-age cooldown (policy.min_release_age): a version younger than this is held back.

A version's release time is its index line's `pubtime` (RFC 3339, written by crates.io since 2025), else
the first time this mirror saw the line. The first time the mirror sees a crate's index file at all, its
lines without a pubtime form the baseline and count as old (otherwise turning the cooldown on would hold
back every crate whose file predates pubtime); a line that appears in a later copy is timed from then.
First-seen times are kept durably in the store's side table
(`released:<crate>`, shared by the workers), so a restart never makes an old line young again; a
`pubtime` in the future (upstream data is unsigned) is not believed and the first-seen time is used.

With policy.cooldown_exempts_fixes, a version that an advisory does not affect while the version just
before it is affected (the patched release) is never held back: a fix must not wait out the cooldown.
The table is learned when the policy builds a crate's index view; a download then looks its version up.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from cachetools import TTLCache

from cratemirror.fleet.storage.disk import Store
from cratemirror.policy.advisories import AdvisoryDb
from cratemirror.versions import RequirementError, Version, parse_version

COOLDOWN_RULE = "cooldown"
RELEASED_KEY = "released:"
MEMO_SECONDS = 30.0
MAX_VERSIONS = 20_000  # lines learned per index file
MAX_PUBTIME_LENGTH = 40
FUTURE_SKEW = 300.0  # a pubtime more than this ahead of our clock is not believed

# (released at, exempt as the fix of an advisory)
Release = tuple[float, bool]


def format_age(seconds: float) -> str:
    """3d 4h, 2h 5m, 5m 10s, 12s."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{value}{unit}" for value, unit in parts if value]
    return " ".join(shown[:2]) or "0s"


def utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def parse_pubtime(value: object) -> float | None:
    """An index line's `pubtime` as a timestamp, or None if absent or not a time."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PUBTIME_LENGTH:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    stamp = parsed.timestamp()
    return stamp if math.isfinite(stamp) and stamp > 0 else None


def _lines(body: bytes) -> list[tuple[str, Version, float | None]]:
    """(version text, parsed version, pubtime) of the index file's well-formed lines."""
    found = []
    for line in body.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(record, dict) or not isinstance(record.get("vers"), str):
            continue
        try:
            parsed = parse_version(record["vers"])
        except RequirementError:
            continue
        found.append((record["vers"], parsed, parse_pubtime(record.get("pubtime"))))
        if len(found) >= MAX_VERSIONS:
            break
    return found


@dataclass(frozen=True, slots=True)
class Hold:
    released_at: float
    passes_at: float


class Cooldown:
    def __init__(self, store: Store, min_age: float, exempt_fixes: bool) -> None:
        self.store = store
        self.min_age = min_age
        self.exempt_fixes = exempt_fixes
        self._memo: TTLCache[str, dict[str, Release]] = TTLCache(4096, MEMO_SECONDS)

    @property
    def enabled(self) -> bool:
        return self.min_age > 0

    def stored(self, lower: str) -> dict[str, Release]:
        value = self.store.get_json(RELEASED_KEY + lower)
        table: dict[str, Release] = {}
        if isinstance(value, dict):
            for version, item in list(value.items())[:MAX_VERSIONS]:
                if (
                    isinstance(version, str)
                    and isinstance(item, list)
                    and len(item) == 2
                    and isinstance(item[0], (int, float))
                    and math.isfinite(item[0])
                ):
                    table[version] = (float(item[0]), bool(item[1]))
        return table

    def learn(self, lower: str, body: bytes, db: AdvisoryDb) -> dict[str, Release]:
        """Each version's release time (pubtime, else first seen, kept) and fix exemption; stored when
        something is new. Runs in a thread for a large file."""
        now = time.time()
        lines = _lines(body)
        before = self.stored(lower)
        baseline = not before and self.store.get_json(RELEASED_KEY + lower) is None
        advisories = [advisory for advisory in db.for_crate(lower) if not advisory.withdrawn]
        ordered = sorted(lines, key=lambda item: item[1])
        table: dict[str, Release] = {}
        previous: Version | None = None
        for text, parsed, pubtime in ordered:
            if pubtime is not None and pubtime <= now + FUTURE_SKEW:
                released = pubtime
            elif text in before:
                released = before[text][0]
            else:
                released = 0.0 if baseline else now  # first seen: now, unless in the first copy seen
            exempt = (
                self.exempt_fixes
                and previous is not None
                and any(
                    advisory.affects(previous) and not advisory.affects(parsed) for advisory in advisories
                )
            )
            table[text] = (released, exempt)
            previous = parsed
        if table != before:
            self.store.put_json(
                RELEASED_KEY + lower, {version: [at, exempt] for version, (at, exempt) in table.items()}
            )
        self._memo[lower] = table
        return table

    def hold(self, lower: str, version: str, now: float | None = None) -> Hold | None:
        """Whether this version is still in its cooldown (None: it passes, or it was never seen)."""
        if not self.enabled:
            return None
        table = self._memo.get(lower)
        if table is None or version not in table:
            table = self.stored(lower)
            if table:
                self._memo[lower] = table
        release = table.get(version)
        if release is None or release[1]:
            return None
        passes = release[0] + self.min_age
        return Hold(release[0], passes) if (now if now is not None else time.time()) < passes else None

    def reason(self, name: str, version: str, hold: Hold, now: float | None = None) -> str:
        now = now if now is not None else time.time()
        return (
            f"{name} {version} was published {format_age(now - hold.released_at)} ago "
            f"({utc(hold.released_at)}); this mirror holds back releases younger than "
            f"{format_age(self.min_age)} (policy.min_release_age): it passes at {utc(hold.passes_at)}, "
            f"in {format_age(hold.passes_at - now)}; pin an older version meanwhile, or ask the mirror's "
            f"operators for an allow entry ({name.lower()}@={version})"
        )
