"""IndexService: sparse-index files with a freshness TTL, ETag revalidation, stale-if-error and a
negative cache, plus the upstream's config.json (where its tarballs live)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import TypeVar

from cachetools import LRUCache

from cratemirror.cache.delivery import CacheResult, MetricResult
from cratemirror.cache.internal import INTERNAL_RULE, InternalNames
from cratemirror.cache.prefetch import Prefetcher, PrefetchMode
from cratemirror.cache.singleflight import SingleFlight
from cratemirror.conditions import LastingCondition
from cratemirror.config.schema import CacheConfig
from cratemirror.fleet.coordination import Coordination, LocalCoordination
from cratemirror.fleet.storage import LocalShared, SharedStorage
from cratemirror.fleet.storage.disk import DiskTrouble, IndexEntry, Store
from cratemirror.keys import index_key, refresh_key
from cratemirror.metrics import Metrics
from cratemirror.names import CrateName, CrateVersion, InvalidRequest, is_cksum
from cratemirror.upstream.client import Upstream, UpstreamError, UpstreamNotFound

log = logging.getLogger("cratemirror.index")
# A refresh another caller claimed stands this long; its copy is looked for this often meanwhile.
STANDING_REFRESH_WAIT = 1.0
STANDING_REFRESH_POLL = 0.02
REFRESH_ROUNDS = 3  # a refresh waits out at most this many standing ones

V = TypeVar("V")

UPSTREAM_CONFIG_KEY = "upstream-config"
# How often a warm hit may look at the refresh generation stamp (a stat): `cratemirror refresh` reaches
# every worker within this, and a worker answering thousands of hits a second stats a few hundred times.
GENERATION_CHECK_SECONDS = 0.005
GZIP_BYTES = 16 * 1024 * 1024
GZIP_MIN = 1024  # smaller bodies gain too little to be worth a Content-Encoding
GZIP_IN_THREAD = 64 * 1024  # compressing a larger body would hold up the event loop for milliseconds
# A remembered 404 outlives its TTL a little so it can still answer while upstream is failing.
NEGATIVE_GRACE = 3600.0
# A shared copy checked later than now plus this (a replica's clock ahead) is not taken: it would pin
# itself as fresh.
CLOCK_SKEW = 10.0


class OfflineMiss(Exception):
    """Offline mode and the file is not cached: the client gets 503."""


@dataclass(frozen=True, slots=True)
class IndexResult:
    entry: IndexEntry  # status 200 (a file) or 404 (not found upstream)
    x_cache: CacheResult
    result: MetricResult  # the metric label (a 404 from upstream: negative)
    shared: bool = False  # another worker process fetched it while this one waited on the lock


def _remember(cache: LRUCache[str, V], key: str, value: V) -> None:
    with contextlib.suppress(ValueError):  # larger than the whole budget: just not kept
        cache[key] = value


def _entry_size(entry: IndexEntry) -> int:
    return len(entry.body) + 256  # body plus a rough allowance for the rest


def body_etag(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()[:40]}"'


class IndexService:
    def __init__(
        self,
        store: Store,
        upstream: Upstream,
        metrics: Metrics,
        cache: CacheConfig,
        *,
        offline: bool,
        disk_trouble: DiskTrouble,
        coordination: Coordination | None = None,
        shared: SharedStorage | None = None,
        prefetch: PrefetchMode = "off",
    ) -> None:
        self.store = store
        self.coordination = coordination or LocalCoordination(store)
        self.shared = shared or LocalShared()
        self.upstream = upstream
        self.metrics = metrics
        self.cache = cache
        self.offline = offline
        self._flights: SingleFlight[IndexResult] = SingleFlight()
        # Recently used entries in memory, least-recently-used out beyond cache.memory_size.
        self._hot: LRUCache[str, IndexEntry] = LRUCache(cache.memory_size, getsizeof=_entry_size)
        # Told the key of every entry that changes in this worker (None: all of them).
        self._listeners: list[Callable[[str | None], None]] = []
        self._generation_checked_at = 0.0
        # Gzipped bodies by ETag, made on the first request that accepts gzip (cargo's curl does).
        self._gzipped: LRUCache[str, bytes] = LRUCache(GZIP_BYTES, getsizeof=len)
        self._dl_template: str | None = None
        self._dl_checked_at = 0.0
        self._config_flight: SingleFlight[str] = SingleFlight()
        self.disk_trouble = disk_trouble
        # Revalidations running behind stale answers (kept so they are not garbage-collected).
        self._background: set[asyncio.Task[tuple[IndexResult, bool]]] = set()
        # Lasting conditions: one log line a minute with a count, not one per request.
        self._stale = LastingCondition(log, "serving stale index files while upstream fails")
        self._revalidation_failed = LastingCondition(log, "background revalidation failing")
        self._generation = store.index_generation()
        self.internal: InternalNames | None = None  # policy.internal_names, on crates.io's bundle only
        self.prefetch = Prefetcher(
            self._prefetch_one, "off" if offline else prefetch, upstream.config.max_connections
        )

    async def close(self) -> None:
        await self.prefetch.close()
        for task in self._background:
            task.cancel()
        await self._flights.cancel_all()
        await self._config_flight.cancel_all()

    # --- index files -------------------------------------------------------------------------

    async def get(
        self, crate: CrateName, *, newer_than: float | None = None, count: bool = True
    ) -> IndexResult:
        """The index file for `crate`. `newer_than`: a wall-clock time the copy must have been checked
        after (a download asking for a version the cached copy lacks). `count`: whether coalescing
        counts in metrics (False for the lookup a download does internally)."""
        if self.internal and self.internal.matches(crate.name):  # crates.io only: never asked upstream
            return self._internal(crate)
        entry = self._lookup(crate.lower)
        if entry is not None and (self.offline or self._is_fresh(entry, newer_than)):
            return self._cached_result(entry)
        if self.offline:
            raise OfflineMiss(f"offline and index file {crate.index_path!r} is not cached")
        if entry is not None and newer_than is None and self._may_serve_stale(entry):
            # RFC 5861 stale-while-revalidate: a warm client never waits on upstream inside the window.
            self._revalidate_behind(crate)
            return IndexResult(entry, CacheResult.STALE, MetricResult.STALE)
        key = index_key(crate.lower)
        result, joined = await self._flights.run(key, lambda: self._refresh(crate, newer_than))
        if joined or result.shared:
            # Served by someone else's fetch: one upstream request is one miss, however many waited.
            if count:
                self.metrics.coalesced.labels("index").inc()
            if result.result in (MetricResult.MISS, MetricResult.REVALIDATED):
                served = MetricResult.HIT if result.entry.status == 200 else MetricResult.NEGATIVE
                result = dataclasses.replace(result, result=served)
        return result

    def _internal(self, crate: CrateName) -> IndexResult:
        assert self.internal is not None
        self.internal.refuse(crate.name)
        self.metrics.policy_decisions.labels("block", INTERNAL_RULE).inc()
        refused = IndexEntry(404, b"", '""', "", time.time())
        return IndexResult(refused, CacheResult.HIT, MetricResult.NEGATIVE)

    async def _prefetch_one(self, crate: CrateName) -> bytes | None:
        result = await self.get(crate, count=False)
        return result.entry.body if result.entry.status == 200 else None

    async def refresh(self, crate: CrateName, since: float | None = None) -> IndexResult:
        """Revalidate with upstream now, whatever the copy's age (`cratemirror refresh`): always an
        upstream request, never answered from the shared storage or another replica's word; every
        worker process then drops its in-memory copies. Refreshes of one name at once share one.
        `since`: another caller's refresh of this name, started then, stands (POST /-/refresh reaches
        upstream once a second per name): its answer, or the copy it stored, is this one's too."""
        if self.offline:  # the cached copy as it is (OfflineMiss if none)
            return await self.get(crate, newer_than=time.time(), count=False)
        key = refresh_key(crate.lower)
        if since is not None:
            if self._flights.active(key):  # in this worker: join it
                result, _ = await self._flights.run(key, lambda: self._refresh(crate, since))
                return result
            stored = await self._await_standing_refresh(crate, since)
            if stored is not None:
                return stored
            return await self.get(crate, newer_than=since, count=False)
        result, _ = await self._flights.run(
            key, lambda: self._refresh(crate, time.time(), from_upstream=True)
        )
        await asyncio.to_thread(self.store.bump_index_generation)
        self.check_generation(force=True)
        return result

    async def refresh_once_per(
        self, crate: CrateName, interval: float, claim: Callable[[], Awaitable[float | None]]
    ) -> IndexResult:
        """A refresh that reaches upstream at most once per `interval` per name, across workers and
        replicas: `claim` takes the name's slot (None), or says when the standing refresh started. A
        caller that arrives while that one is in flight shares its answer; one that arrives after it
        finished waits out its interval and asks upstream itself, so the answer is never older than
        the request."""
        asked_at = time.time()
        standing = None
        for _ in range(REFRESH_ROUNDS):
            standing = await claim()
            if standing is None:
                return await self.refresh(crate)
            entry = self.store.get_index(crate.lower)
            if entry is None or not standing <= entry.checked_at <= asked_at:
                break  # still in flight: share it
            await asyncio.sleep(max(STANDING_REFRESH_POLL, standing + interval - time.time()))
        return await self.refresh(crate, since=standing)

    async def _await_standing_refresh(self, crate: CrateName, since: float) -> IndexResult | None:
        """The copy another worker's or replica's standing refresh stores, once it has: that refresh
        holds the key's lock while it asks upstream, but may not have taken it yet when we look, so we
        look again after it could have (bounded: its claim lasts STANDING_REFRESH_WAIT at most)."""
        deadline = time.monotonic() + STANDING_REFRESH_WAIT
        while True:
            async with self.coordination.lock(index_key(crate.lower)):
                entry = self.store.get_index(crate.lower)
            if entry is not None and entry.checked_at >= since:
                _remember(self._hot, crate.lower, entry)
                return dataclasses.replace(self._cached_result(entry), shared=True)
            if time.monotonic() >= deadline:
                return None  # the refresh that stood did not store a copy: ask ourselves
            await asyncio.sleep(STANDING_REFRESH_POLL)

    def _may_serve_stale(self, entry: IndexEntry) -> bool:
        # Only files: a remembered 404 is asked again at once, so a new crate is visible immediately.
        age = time.time() - entry.checked_at
        return entry.status == 200 and age < self.cache.index_ttl + self.cache.stale_while_revalidate

    def _revalidate_behind(self, crate: CrateName) -> None:
        """One background revalidation per key: in this process through the flight, across worker
        processes through the store lock (a waiter finds the copy fresh and does not fetch)."""
        key = index_key(crate.lower)
        if self._flights.active(key):
            return
        task = asyncio.ensure_future(self._flights.run(key, lambda: self._refresh(crate, None)))
        self._background.add(task)
        task.add_done_callback(self._revalidated)

    def _revalidated(self, task: asyncio.Task[tuple[IndexResult, bool]]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._revalidation_failed.happened(str(task.exception()))
        elif not task.cancelled():
            self._revalidation_failed.ended()

    def answers_from_cache(self, crate: CrateName) -> bool:
        """Whether get() would answer without waiting on upstream (fresh, offline, or stale within the
        stale-while-revalidate window): such a lookup costs the client nothing."""
        entry = self._lookup(crate.lower)
        if entry is None:
            return self.offline
        return self.offline or self._is_fresh(entry, None) or self._may_serve_stale(entry)

    def is_cached(self, crate: CrateName) -> bool:
        """Whether any copy (fresh or not, found or remembered as missing) is held."""
        return crate.lower in self._hot or self.store.get_index(crate.lower) is not None

    def on_change(self, listener: Callable[[str | None], None]) -> None:
        """Call `listener(lower)` whenever this worker holds a new entry for a key, and
        `listener(None)` when it drops them all (a refresh elsewhere): for copies made from entries."""
        self._listeners.append(listener)

    def _changed(self, lower: str | None) -> None:
        for listener in self._listeners:
            listener(lower)

    def _keep(self, lower: str, entry: IndexEntry) -> None:
        _remember(self._hot, lower, entry)
        self._changed(lower)

    def check_generation(self, *, force: bool = False) -> None:
        """Drop the in-memory copies if `cratemirror refresh` rewrote stored entries (in any worker or
        process): one stat at most every GENERATION_CHECK_SECONDS, not one per request."""
        now = time.monotonic()
        if not force and now - self._generation_checked_at < GENERATION_CHECK_SECONDS:
            return
        self._generation_checked_at = now
        generation = self.store.index_generation()
        if generation != self._generation:
            self._generation = generation
            self._hot.clear()
            self._changed(None)

    def current(self, lower: str) -> IndexEntry | None:
        """The entry this worker holds in memory for `lower` (no I/O)."""
        return self._hot.get(lower)

    def _lookup(self, lower: str) -> IndexEntry | None:
        """The hot copy while it is fresh (no SQLite read, no unpickling on a warm hit), else the
        store's, which another worker process may have refreshed meanwhile."""
        self.check_generation()
        entry = self._hot.get(lower)
        if entry is not None and self._is_fresh(entry, None):
            return entry
        entry = self.store.get_index(lower)
        if entry is not None:
            self._keep(lower, entry)
        return entry

    async def gzipped(self, entry: IndexEntry) -> bytes:
        """The entry's body gzipped, deterministically (every worker sends the same bytes), made once
        per version of the file and worker."""
        compressed = self._gzipped.get(entry.etag)
        if compressed is None:
            if len(entry.body) >= GZIP_IN_THREAD:
                compressed = await asyncio.to_thread(gzip.compress, entry.body, 6, mtime=0)
            else:
                compressed = gzip.compress(entry.body, 6, mtime=0)
            _remember(self._gzipped, entry.etag, compressed)
        return compressed

    def _is_fresh(self, entry: IndexEntry, newer_than: float | None) -> bool:
        if newer_than is not None:
            return entry.checked_at >= newer_than
        ttl = self.cache.index_ttl if entry.status == 200 else self.cache.negative_ttl
        return time.time() - entry.checked_at < ttl

    def _cached_result(self, entry: IndexEntry) -> IndexResult:
        if entry.status != 200:
            return IndexResult(entry, CacheResult.HIT, MetricResult.NEGATIVE)
        if time.time() - entry.checked_at < self.cache.index_ttl:
            return IndexResult(entry, CacheResult.HIT, MetricResult.HIT)
        return IndexResult(entry, CacheResult.STALE, MetricResult.STALE)  # offline: served however old

    async def _refresh(
        self, crate: CrateName, newer_than: float | None, *, from_upstream: bool = False
    ) -> IndexResult:
        """`from_upstream` (a refresh): ask upstream whatever another worker or replica holds."""
        async with self.coordination.lock(index_key(crate.lower)):
            # Another worker process may have refreshed it while we waited for the lock.
            entry = self.store.get_index(crate.lower)
            if not from_upstream and entry is not None and self._is_fresh(entry, newer_than):
                self._keep(crate.lower, entry)
                return dataclasses.replace(self._cached_result(entry), shared=True)
            shared = None if from_upstream else await self._shared_entry(crate)
            if shared is not None and (entry is None or shared.checked_at > entry.checked_at):
                # Another replica checked it more recently: take its copy (and its validators).
                await self._put(crate.lower, shared)
                entry = shared
                if self._is_fresh(entry, newer_than):
                    return IndexResult(entry, CacheResult.HIT, MetricResult.HIT, shared=True)
            missing_since = None
            if not from_upstream:
                missing_since = await self.coordination.missing_since(index_key(crate.lower))
            if missing_since is not None and (newer_than is None or missing_since >= newer_than):
                # Another replica asked upstream a moment ago: "not found" holds here too.
                known = IndexEntry(404, b"", "", formatdate(missing_since, usegmt=True), missing_since)
                await self._put(crate.lower, known, expire=self.cache.negative_ttl + NEGATIVE_GRACE)
                return IndexResult(known, CacheResult.HIT, MetricResult.NEGATIVE, shared=True)
            held = entry if entry is not None and entry.status == 200 else None
            try:
                fetched = await self.upstream.fetch_index(
                    crate.index_path,
                    held.upstream_etag if held else None,
                    held.upstream_last_modified if held else None,
                )
            except UpstreamError as exc:
                if held is not None and self._within_stale_window(held):
                    self._stale.happened(f"{crate.index_path}: {exc}")
                    return IndexResult(held, CacheResult.STALE, MetricResult.STALE)
                raise
            self._stale.ended()
            checked_at = time.time()
            if held is not None and (
                fetched.status == 304 or (fetched.status == 200 and fetched.body == held.body)
            ):
                # Confirmed (or re-sent identical bytes when upstream ignored our validators): keep our
                # ETag and date, remember the upstream's newest validators.
                renewed = dataclasses.replace(
                    held,
                    checked_at=checked_at,
                    upstream_etag=fetched.etag or held.upstream_etag,
                    upstream_last_modified=fetched.last_modified or held.upstream_last_modified,
                )
                await self._put(crate.lower, renewed)
                await self._share(crate, renewed)
                return IndexResult(renewed, CacheResult.REVALIDATED, MetricResult.REVALIDATED)
            if fetched.status == 200:
                # Hashing a file of many MiB would hold up every other request on this worker.
                big = len(fetched.body) > FIND_IN_THREAD
                etag = await asyncio.to_thread(body_etag, fetched.body) if big else body_etag(fetched.body)
                fresh = IndexEntry(
                    200, fetched.body, etag,
                    fetched.last_modified or formatdate(checked_at, usegmt=True), checked_at,
                    fetched.etag, fetched.last_modified,
                )  # fmt: skip
                # Before the file is stored: its dependencies' fetches are in flight before any client
                # can read it and ask for them (a client asking then joins the prefetch, never races it).
                self.prefetch.after_fetch(crate, fresh.body)
                await self._put(crate.lower, fresh)
                await self._share(crate, fresh)
                return IndexResult(fresh, CacheResult.MISS, MetricResult.MISS)
            # 404 (or a 304 we did not ask for): remember "not found" for negative_ttl.
            missing = IndexEntry(404, b"", "", formatdate(checked_at, usegmt=True), checked_at)
            await self._put(crate.lower, missing, expire=self.cache.negative_ttl + NEGATIVE_GRACE)
            await self.coordination.remember_missing(
                index_key(crate.lower), checked_at, self.cache.negative_ttl
            )
            return IndexResult(missing, CacheResult.MISS, MetricResult.MISS)

    def _within_stale_window(self, entry: IndexEntry) -> bool:
        age = time.time() - entry.checked_at
        return age < self.cache.index_ttl + self.cache.stale_if_error

    async def _shared_entry(self, crate: CrateName) -> IndexEntry | None:
        """Another replica's copy (authenticated by the storage), unless checked in the future."""
        try:
            entry = await self.shared.get_index(crate)
        except Exception as exc:  # the bucket failing: go on as a lone replica
            log.warning("shared storage: could not read the index file of %s: %s", crate.name, exc)
            return None
        if entry is not None and entry.checked_at > time.time() + CLOCK_SKEW:
            log.warning(
                "shared storage: the index file of %s says it was checked %.0f s from now (a replica's "
                "clock ahead?): not taken, asking upstream", crate.name, entry.checked_at - time.time(),
            )  # fmt: skip
            return None
        return entry

    async def _share(self, crate: CrateName, entry: IndexEntry) -> None:
        try:
            await self.shared.put_index(crate, entry)
        except Exception as exc:
            log.warning("shared storage: could not store the index file of %s: %s", crate.name, exc)

    async def _put(self, lower: str, entry: IndexEntry, expire: float | None = None) -> None:
        """Store an entry; a full or read-only disk costs the cache, never the answer."""
        self._keep(lower, entry)
        try:
            await asyncio.to_thread(self.store.put_index, lower, entry, expire)
        except (OSError, sqlite3.Error) as exc:
            self._store_failed(f"could not store index file for {lower}: {exc}")

    def _store_failed(self, reason: str) -> None:
        self.disk_trouble.report(reason)

    # --- the upstream's config.json ------------------------------------------------------------

    async def dl_template(self) -> str:
        """The upstream's `dl` value, re-read every index_ttl; the last known one while it fails."""
        if self._dl_template is not None and (
            self.offline or time.time() - self._dl_checked_at < self.cache.index_ttl
        ):
            return self._dl_template
        template, _ = await self._config_flight.run("config", self._load_dl_template)
        return template

    async def _load_dl_template(self) -> str:
        stored = self.store.get_json(UPSTREAM_CONFIG_KEY)
        known = stored.get("dl") if isinstance(stored, dict) else None
        if self.offline:
            if not isinstance(known, str):
                raise OfflineMiss("offline and the upstream's config.json was never fetched")
            self._dl_template = known
            return known
        try:
            document = await self.upstream.fetch_json("config.json")
        except (UpstreamError, UpstreamNotFound) as exc:
            if isinstance(known, str):
                log.warning("upstream config.json unavailable, using the stored one: %s", exc)
                self._dl_template = known
                return known
            raise UpstreamError(f"upstream config.json: {exc}") from exc
        dl = document.get("dl") if isinstance(document, dict) else None
        if not isinstance(dl, str) or not dl:
            raise UpstreamError(f"upstream config.json has no 'dl': {json.dumps(document)[:200]}")
        dl = dl.rstrip("/")
        try:
            await asyncio.to_thread(self.store.put_json, UPSTREAM_CONFIG_KEY, {"dl": dl})
        except (OSError, sqlite3.Error) as exc:
            self._store_failed(f"could not store upstream config.json: {exc}")
        self._dl_template = dl
        self._dl_checked_at = time.time()
        return dl


class MalformedIndexLine(UpstreamError):
    """The upstream's line for a requested version cannot be trusted: the client gets 502."""


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """A version's index line, validated: its name is the requested crate's (as the registry spells
    it: case matters in download URLs), its version passed the version rules, its cksum is 64 hex."""

    key: CrateVersion
    cksum: str

    @property
    def name(self) -> str:
        return self.key.crate.name


# Above this many bytes, a lookup runs in a thread so the event loop keeps serving.
FIND_IN_THREAD = 256 * 1024


async def find_version_async(body: bytes, crate: CrateName, version: str) -> VersionRecord | None:
    if len(body) > FIND_IN_THREAD:
        return await asyncio.to_thread(find_version, body, crate, version)
    return find_version(body, crate, version)


def find_version(body: bytes, crate: CrateName, version: str) -> VersionRecord | None:
    """The record of `version` in the index file of `crate`, or None if the file has no such version.

    Index lines are upstream (or bundle) input: a line for this version is used only if it parses,
    names this crate (case-folded), and carries a valid version and a 64-hex cksum; otherwise
    MalformedIndexLine, so a hostile line can neither poison another crate nor pick a path. Only
    candidate lines are parsed: a download should not JSON-decode a 500 KB file."""
    needle = f'"vers":"{version}"'.encode()
    candidates = [line for line in body.splitlines() if needle in line]
    if not candidates:
        # Lines written by another registry may space their JSON differently.
        candidates = [line for line in body.splitlines() if version.encode() in line]
    problem: str | None = None
    for line in candidates:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # deep nesting raises RecursionError, not ValueError
            problem = "a line that is not valid JSON"
            continue
        if not isinstance(record, dict) or record.get("vers") != version:
            continue
        name, cksum = record.get("name"), record.get("cksum")
        if not isinstance(name, str) or name.lower() != crate.lower:
            problem = f"a line for {version} that names another crate"
            continue
        if not is_cksum(cksum):
            problem = f"a line for {version} whose cksum is not 64 lowercase hex digits"
            continue
        try:
            key = CrateVersion(CrateName(name), version)
        except InvalidRequest:
            problem = f"a line for {version} with an invalid name or version"
            continue
        return VersionRecord(key, str(cksum))
    if problem is not None:
        log.warning("index file of %s: ignoring %s", crate.name, problem)
        raise MalformedIndexLine(f"the upstream index file of {crate.name} has {problem}")
    return None
