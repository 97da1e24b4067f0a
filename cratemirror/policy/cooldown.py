"""The release-age cooldown (policy.min_release_age): a version younger than this is held back.

A version's release time is its index line's `pubtime` (RFC 3339, written by crates.io since 2025), else
the first time this mirror (in a fleet: any replica) saw the line. The first time the mirror (the fleet)
sees a crate's index file at all, its lines without a pubtime form the baseline and count as old
(otherwise turning the cooldown on would hold back every crate whose file predates pubtime); a line that
appears in a later copy is timed from then. First-seen times are kept durably in the store's side table
(`released:<crate>`, shared by the workers), so a restart never makes an old line young again; a
`pubtime` in the future (upstream data is unsigned) is not believed and the first-seen time is used.

In a fleet (storage.backend s3) the side table is this replica's cache of the fleet's times, which live
in the bucket, one authenticated object per crate (`first-seen/<crate>`). When a replica learns a copy
of a crate's index file it has not merged yet (a new ETag) and some line lacks a believed pubtime, it
reads that object, takes the earliest time per version, and writes the object back if it lacked a
version or had a later time. So a replica seeing a line hours after another one times it from the
first sighting, and a replica seeing a crate for the first time is not at the baseline when the fleet
has seen it. Requests never wait on the bucket: `hold()` reads the side table only.

With policy.cooldown_exempts_fixes, a version that an advisory does not affect while the version just
before it is affected (the patched release) is never held back: a fix must not wait out the cooldown.
The table is learned when the policy builds a crate's index view; a download then looks its version up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeGuard

from cachetools import TTLCache

from cratemirror import names
from cratemirror.fleet.storage import SharedStorage
from cratemirror.fleet.storage.disk import IndexEntry, Store
from cratemirror.names import CrateName
from cratemirror.policy.advisories import AdvisoryDb
from cratemirror.versions import RequirementError, Version, parse_version

log = logging.getLogger("cratemirror.policy")

COOLDOWN_RULE = "cooldown"
RELEASED_KEY = "released:"
MERGED_KEY = "released-merged:"  # the ETag of the copy of a crate's file last merged with the fleet's times
MEMO_SECONDS = 30.0
MAX_VERSIONS = 20_000  # lines learned per index file
MAX_PUBTIME_LENGTH = 40
FUTURE_SKEW = 300.0  # a pubtime more than this ahead of our clock is not believed
FIRST_SEEN_FORMAT = 1
FIRST_SEEN_BYTES = 4 * 1024 * 1024  # a first-seen object: MAX_VERSIONS of the longest versions fit
FLEET_RETRY = 60.0  # seconds: a view learned while the bucket was unreachable is learned again by then

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


def _believed(pubtime: float | None, now: float) -> TypeGuard[float]:
    return pubtime is not None and pubtime <= now + FUTURE_SKEW


def encode_first_seen(times: dict[str, float]) -> bytes:
    """A crate's first-seen object for the bucket: {"v": 1, "seen": {version: time}}."""
    seen = dict(list(times.items())[:MAX_VERSIONS])  # exact: a replica compares them with its own
    return json.dumps({"v": FIRST_SEEN_FORMAT, "seen": seen}, separators=(",", ":")).encode()


def decode_first_seen(body: bytes, now: float) -> dict[str, float]:
    """The times of an object read back from the bucket (already authenticated, still input): valid
    versions only, finite times not in the future, at most MAX_VERSIONS; anything else is left out."""
    if len(body) > FIRST_SEEN_BYTES:
        return {}
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    seen = value.get("seen") if isinstance(value, dict) and value.get("v") == FIRST_SEEN_FORMAT else None
    if not isinstance(seen, dict):
        return {}
    times: dict[str, float] = {}
    for version, at in list(seen.items())[:MAX_VERSIONS]:
        if type(at) not in (int, float) or not math.isfinite(at) or not 0 <= at <= now + FUTURE_SKEW:
            continue
        try:
            times[names.parse_version(version)] = float(at)
        except (names.InvalidRequest, TypeError):
            continue
    return times


def _table(value: object) -> dict[str, Release]:
    """The side table as stored (version -> [released at, exempt]), checked."""
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


def _first_seen(
    text: str, before: dict[str, Release], fleet: dict[str, float] | None, baseline: bool, now: float
) -> float:
    """A line's first-seen time: the earliest sighting this replica or the fleet recorded. A time of 0
    (the line was in a first copy: the baseline) counts only when nobody recorded a sighting: a baseline
    made without the fleet's knowledge (the bucket unreachable, the object deleted, a replica from before
    fleet-wide times) never makes a line old that a replica saw appear. A line nobody knows: now, or 0 in
    the baseline."""
    known = [before[text][0]] if text in before else []
    if fleet is not None and text in fleet:
        known.append(fleet[text])
    sightings = [at for at in known if at > 0]
    if sightings:
        return min(sightings)
    return 0.0 if known or baseline else now


@dataclass(frozen=True, slots=True)
class Hold:
    released_at: float
    passes_at: float


@dataclass(frozen=True, slots=True)
class Known:
    """What this replica knew of a crate before a copy of its index file is learned."""

    lines: list[tuple[str, Version, float | None]]
    before: dict[str, Release]
    first_copy: bool  # no table was stored yet: this is the first copy this replica sees
    merged: str | None  # the ETag of the copy last merged with the fleet's times (None: never)


@dataclass(frozen=True, slots=True)
class Learned:
    releases: dict[str, Release]
    retry_at: float  # the fleet could not be asked (or told): learn again by then (math.inf: no need)


class Cooldown:
    def __init__(
        self, store: Store, min_age: float, exempt_fixes: bool, shared: SharedStorage | None = None
    ) -> None:
        self.store = store
        self.min_age = min_age
        self.exempt_fixes = exempt_fixes
        self.shared = shared  # the fleet's bucket (storage.backend s3), else None
        self._memo: TTLCache[str, dict[str, Release]] = TTLCache(4096, MEMO_SECONDS)

    @property
    def enabled(self) -> bool:
        return self.min_age > 0

    def stored(self, lower: str) -> dict[str, Release]:
        return _table(self.store.get_json(RELEASED_KEY + lower))

    async def learn(self, lower: str, entry: IndexEntry, db: AdvisoryDb) -> Learned:
        """Each version's release time (pubtime, else first seen, kept) and fix exemption; stored when
        something is new. In a fleet, a copy not yet merged whose lines lack a pubtime is merged with
        the bucket's first-seen times (earliest wins) and the bucket gets what it lacked."""
        now = time.time()
        known = await asyncio.to_thread(self._known, lower, entry.body)
        crate = self._fleet_name(lower)
        fleet: dict[str, float] | None = None
        retry_at = math.inf
        undated = any(not _believed(pubtime, now) for _, _, pubtime in known.lines)
        if crate is not None and undated and known.merged != entry.etag:
            fleet = await self._fleet_times(crate, now)
            if fleet is None:
                retry_at = now + FLEET_RETRY
        table, share = await asyncio.to_thread(self._settle, lower, known, fleet, db, now)
        if crate is not None and fleet is not None:
            if share is None or await self._share(crate, share):
                await asyncio.to_thread(self.store.put_json, MERGED_KEY + lower, entry.etag)
            else:
                retry_at = now + FLEET_RETRY
        self._memo[lower] = table
        return Learned(table, retry_at)

    def _fleet_name(self, lower: str) -> CrateName | None:
        if self.shared is None:
            return None
        try:
            return names.parse_name(lower)
        except names.InvalidRequest:
            return None

    async def _fleet_times(self, crate: CrateName, now: float) -> dict[str, float] | None:
        """The bucket's first-seen times of the crate ({} if it has none, or none that authenticate);
        None when the bucket cannot answer."""
        assert self.shared is not None
        try:
            body = await self.shared.get_first_seen(crate, FIRST_SEEN_BYTES)
        except Exception as exc:  # a bucket down: this replica's own times until it answers
            log.info("cooldown: first-seen times of %s not read from the bucket: %s", crate.lower, exc)
            return None
        return await asyncio.to_thread(decode_first_seen, body, now) if body else {}

    async def _share(self, crate: CrateName, body: bytes) -> bool:
        assert self.shared is not None
        try:
            await self.shared.put_first_seen(crate, body)
        except Exception as exc:
            log.info("cooldown: first-seen times of %s not written to the bucket: %s", crate.lower, exc)
            return False
        return True

    def _known(self, lower: str, body: bytes) -> Known:
        stored = self.store.get_json(RELEASED_KEY + lower)
        merged = self.store.get_json(MERGED_KEY + lower) if self.shared is not None else None
        return Known(
            _lines(body), _table(stored), stored is None, merged if isinstance(merged, str) else None
        )

    def _settle(
        self, lower: str, known: Known, fleet: dict[str, float] | None, db: AdvisoryDb, now: float
    ) -> tuple[dict[str, Release], bytes | None]:
        """The table (stored when it changed), and the first-seen object to write to the bucket when the
        fleet was asked and lacks some of what this replica knows."""
        before = known.before
        # The first copy seen (by this replica, and by the fleet when it was asked) is the baseline:
        # its lines without a pubtime count as old.
        baseline = known.first_copy and not fleet
        advisories = [advisory for advisory in db.for_crate(lower) if not advisory.withdrawn]
        ordered = sorted(known.lines, key=lambda item: item[1])
        table: dict[str, Release] = {}
        seen: dict[str, float] = {}  # first-seen times (the lines without a believed pubtime)
        previous: Version | None = None
        for text, parsed, pubtime in ordered:
            if _believed(pubtime, now):
                released = pubtime
            else:
                released = _first_seen(text, before, fleet, baseline, now)
                seen[text] = released
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
        if fleet is None:
            return table, None
        # What other replicas saw that this copy lacks (a newer copy of the file) stays in the object.
        for version, at in fleet.items():
            if len(seen) >= MAX_VERSIONS:
                break
            seen.setdefault(version, at)
        return table, (encode_first_seen(seen) if seen != fleet else None)

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
