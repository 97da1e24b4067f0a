"""CrateService: look up a version's checksum, fetch the tarball once, verify sha256, store, serve.

A fill writes the upstream body to a temp file while hashing it; every client waiting for that crate
reads the temp file as it grows (so memory stays flat however many clients and however large the
crate), but the last chunk is only released once the sha256 matched. The temp file is renamed into
place only after verification and fsync: nothing unverified is ever stored or completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import quote

import aiohttp
from cachetools import LRUCache
from multidict import CIMultiDict

from cratemirror.cache.commits import CommitQueue
from cratemirror.cache.delivery import (
    Blocked,
    CacheResult,
    Delivery,
    Failed,
    FromFile,
    FromFill,
    HeadersOnly,
    MetricResult,
    Redirect,
)
from cratemirror.cache.eviction import evict_to, low_water
from cratemirror.cache.gate import Gate
from cratemirror.cache.index import IndexService, OfflineMiss, VersionRecord, find_version_async
from cratemirror.cache.singleflight import SingleFlight
from cratemirror.cache.spool import MemorySpoolFull, Spool
from cratemirror.fleet.coordination import Coordination, LocalCoordination
from cratemirror.fleet.storage import LocalShared, SharedStorage
from cratemirror.fleet.storage.disk import CrateMeta, DiskTrouble, Store, sha256_stream
from cratemirror.keys import crate_key
from cratemirror.metrics import Metrics
from cratemirror.names import CrateName, CrateVersion, expand_dl_template
from cratemirror.upstream.client import TooLarge, Upstream, UpstreamError, UpstreamNotFound

log = logging.getLogger("cratemirror.crates")

CHUNK = 256 * 1024
MEMO_LIMIT = 65536
TOUCH_INTERVAL = 3600.0
UPLOAD_SHUTDOWN_WAIT = 30.0  # seconds close() waits for uploads to the shared storage
EVICTION_SHUTDOWN_WAIT = 30.0
EVICTION_ROUNDS = 3
CRATE_HEADERS = {
    "Content-Type": "application/gzip",
    "Cache-Control": "public, max-age=31536000, immutable",
}
# Crates up to this size are verified before the first byte goes out, so a checksum mismatch is a clean
# 502; larger ones stream (cargo gives up on a silent connection) and a mismatch cuts the connection.
VERIFY_BEFORE_SENDING = 4 * 1024 * 1024


class NotFound(Exception):
    """Unknown crate or version: the client gets 404."""


class BodyCutOff(Exception):
    """The upstream body stopped before its end (a stall past the timeout, or a cut connection)."""

    def __init__(self, reason: str, timeout: bool) -> None:
        super().__init__(reason)
        self.timeout = timeout


class ChecksumMismatch(Exception):
    """The upstream bytes do not hash to the index cksum: the client gets 502 (or a cut connection)."""


_STORED_HEADERS_MEMO = 4096
_stored_headers: dict[tuple[str, str], CIMultiDict[str]] = {}


def stored_headers(sha256: str, x_cache: str) -> CIMultiDict[str]:
    """A stored crate's response headers, made once per crate and X-Cache value; a copy each time
    (the response adds to its headers). A warm hit builds no header dict."""
    headers = _stored_headers.get((sha256, x_cache))
    if headers is None:
        if len(_stored_headers) >= _STORED_HEADERS_MEMO:
            _stored_headers.clear()
        headers = CIMultiDict({**CRATE_HEADERS, "ETag": f'"{sha256}"', "X-Cache": str(x_cache)})
        _stored_headers[(sha256, x_cache)] = headers
    return headers.copy()


@dataclass(frozen=True, slots=True)
class CachedCrate:
    file: BinaryIO  # opened before anything else, so a concurrent eviction cannot truncate the answer
    size: int
    sha256: str


class Fill:
    """One upstream download in progress, shared by every client of this process asking for it."""

    def __init__(self, name: str, version: str, cksum: str) -> None:
        self.name = name
        self.version = version
        self.cksum = cksum
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = loop.create_future()  # upstream said 200 (or failed)
        self.finished: asyncio.Future[None] = loop.create_future()  # verified and stored (or failed)
        self.content_length: int | None = None
        self.published = 0  # bytes clients may be sent: all but the newest chunk until verified
        self.streamed = False  # a client has been sent bytes: a cut-off download can no longer be retried
        self.spool: Spool | None = None
        self.stored_elsewhere = False  # another worker process had stored it: serve the file
        self.from_shared = False  # ... or another replica had, in the shared storage (a hit for us)
        self._holders = 1  # the fill itself, plus every client reading the spool
        self._progress = asyncio.Event()

    def begin(self, content_length: int | None) -> None:
        self.content_length = content_length
        self.published = 0
        if not self.started.done():
            self.started.set_result(None)

    def publish(self, position: int) -> None:
        self.published = position
        self._wake()

    def succeed(self, size: int) -> None:
        self.published = size
        if not self.started.done():
            self.started.set_result(None)
        self.finished.set_result(None)
        self._wake()

    def fail(self, error: BaseException) -> None:
        if isinstance(error, asyncio.CancelledError):  # shutting down: waiters get an answer, not a cancel
            error = UpstreamError("the mirror is shutting down", status=503)
        for future in (self.started, self.finished):
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a fill nobody waits for is not an "unhandled" error
        self._wake()

    def read_at(self, position: int, size: int) -> bytes:
        assert self.spool is not None
        self.streamed = True
        return self.spool.read_at(position, min(size, self.published - position))

    async def wait_beyond(self, position: int) -> None:
        while self.published <= position and not self.finished.done():
            event = self._progress
            await event.wait()

    def hold(self) -> None:
        self._holders += 1

    def release(self) -> None:
        """The last holder closes the spool (a client may still be reading after the fill ended)."""
        self._holders -= 1
        if self._holders == 0 and self.spool is not None:
            self.spool.release()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()


class CrateService:
    def __init__(
        self,
        store: Store,
        index: IndexService,
        upstream: Upstream,
        metrics: Metrics,
        *,
        offline: bool,
        max_size: int,
        disk_trouble: DiskTrouble,
        coordination: Coordination | None = None,
        shared: SharedStorage | None = None,
    ) -> None:
        self.store = store
        self.coordination = coordination or LocalCoordination(store)
        self.shared = shared or LocalShared()
        self._uploads: set[asyncio.Task[None]] = set()  # to the shared storage; finished at close
        self._commits = CommitQueue(store)
        self.max_size = max_size
        self._eviction: asyncio.Task[None] | None = None  # at most one per process
        self.index = index
        self.upstream = upstream
        self.metrics = metrics
        self.offline = offline
        self._fills: SingleFlight[None] = SingleFlight()
        self._active: dict[str, Fill] = {}
        # crate -> when a missing version made us look upstream
        self._missing_checked: LRUCache[str, float] = LRUCache(MEMO_LIMIT)
        # "name/version" -> sha256: saves a metadata read per hit
        self._sha_memo: LRUCache[str, str] = LRUCache(MEMO_LIMIT)
        self._paths: dict[tuple[str, str], str] = {}  # (name, version) -> its file, once validated
        self.disk_trouble = disk_trouble
        # The policy, for the registries it applies to: asked before a crate is fetched or sent.
        self.gate: Gate | None = None

    async def close(self) -> None:
        if self._uploads:  # what was stored here reaches the other replicas (warm exits right after)
            await asyncio.wait(self._uploads, timeout=UPLOAD_SHUTDOWN_WAIT)
        await self._fills.cancel_all()
        await self._commits.close()
        if self._eviction is not None:
            # Its thread cannot be cancelled: give it a bounded time to finish (warm exits right after).
            await asyncio.wait({self._eviction}, timeout=EVICTION_SHUTDOWN_WAIT)

    def _path(self, name: str, version: str) -> str:
        """The stored file of a version, validated and built once per key (not per hit)."""
        path = self._paths.get((name, version))
        if path is None:
            path = str(self.store.crate_path(name, version))
            if len(self._paths) >= MEMO_LIMIT:
                self._paths.clear()
            self._paths[(name, version)] = path
        return path

    def holds(self, name: str, version: str) -> bool:
        """Whether the store has the file (one stat)."""
        return os.path.exists(self._path(name, version))

    def open_cached(self, name: str, version: str) -> CachedCrate | None:
        if self.index.internal and self.index.internal.matches(name):
            return None  # policy.internal_names: not even a copy cached before the rule is served
        path = self._path(name, version)
        try:
            # Unbuffered: the answer is a pread or a sendfile of the descriptor, never a buffered read.
            handle = open(path, "rb", buffering=0)  # noqa: SIM115 - handed to the response, which closes it
        except (FileNotFoundError, NotADirectoryError):
            return None
        key = f"{name}/{version}"
        sha = self._sha_memo.get(key)
        if sha is None:
            meta = self.store.get_crate_meta(name, version)
            if meta is None:
                handle.close()  # no recorded checksum (crash between writes): treat as a miss
                return None
            sha = self._sha_memo[key] = meta.sha256
        stat = os.fstat(handle.fileno())
        if time.time() - stat.st_mtime > TOUCH_INTERVAL:
            # Recency for LRU eviction (the ledger's order; the mtime says when we last wrote it): at
            # most hourly, so a hot crate costs no metadata write per hit.
            with contextlib.suppress(OSError):
                os.utime(handle.fileno())
            self._touch_later(name, version)
        return CachedCrate(handle, stat.st_size, sha)

    def _touch_later(self, name: str, version: str) -> None:
        """The ledger write off the event loop: it may wait for an eviction's short transaction."""

        def touch() -> None:
            with contextlib.suppress(sqlite3.Error):
                self.store.touch_crate(name, version)

        try:
            asyncio.get_running_loop().run_in_executor(None, touch)
        except RuntimeError:  # no loop (a tool): inline
            touch()

    async def adopt_unrecorded(self, record: VersionRecord, version: str) -> CachedCrate | None:
        """A stored file whose metadata is gone (a crash between the two writes, or metadata lost to
        a full disk) is served again if it hashes to the index cksum; a file that does not is removed."""
        path = self.store.crate_path(record.name, version)
        if not path.exists() or self.store.get_crate_meta(record.name, version) is not None:
            return None
        with open(path, "rb") as handle:
            digest, size = await asyncio.to_thread(sha256_stream, handle)
        if digest != record.cksum:
            log.warning("removing %s: it does not match the index cksum", path)
            await asyncio.to_thread(self.store.remove_crate, record.name, version)
            return None
        with contextlib.suppress(OSError, sqlite3.Error):
            self.store.record_crate(CrateMeta(record.name, version, digest, size, time.time()))
        self._sha_memo[f"{record.name}/{version}"] = digest
        return self.open_cached(record.name, version)

    async def resolve(self, request: CrateVersion) -> VersionRecord:
        """The index record for a requested version; NotFound if the registry has no such version.
        A cached index file that lacks the version is revalidated once: it may be newly published."""
        asked_at = time.time()
        result = await self.index.get(request.crate, count=False)
        if result.entry.status != 200:
            raise NotFound(f"crate {request.crate.name!r} not found")
        record = await find_version_async(result.entry.body, request.crate, request.version)
        if (
            record is None
            and result.x_cache != CacheResult.MISS
            and self._may_recheck(request.crate.lower, asked_at)
        ):
            result = await self.index.get(request.crate, newer_than=asked_at, count=False)
            if result.entry.status == 200:
                record = await find_version_async(result.entry.body, request.crate, request.version)
        if record is None:
            if result.entry.status != 200:
                raise NotFound(f"crate {request.crate.name!r} not found")
            raise NotFound(f"crate {request.crate.name!r} has no version {request.version!r}")
        return record

    def _may_recheck(self, key: str, now: float) -> bool:
        """A version missing from a cached index file may be newly published: look upstream again,
        but at most once per negative_ttl per crate, so asking for versions that do not exist cannot
        hammer upstream."""
        if self.offline or now - self._missing_checked.get(key, -math.inf) < self.index.cache.negative_ttl:
            return False
        self._missing_checked[key] = now
        return True

    # ---- the download decision -----------------------------------------------------------------

    async def deliver(self, wanted: CrateVersion, *, head: bool, client: str) -> Delivery:
        """Everything a download decides, as one value: from the store, from a fill, a redirect to the
        shared storage, headers only, blocked by the gate, or failed. `client` names who asked (the
        gate's log and audit)."""
        # storage.s3.serve redirect sends clients to the bucket; with a gate the bytes pass through us.
        redirecting = self.shared.redirects and self.gate is None
        if not redirecting:
            cached = self.open_cached(wanted.crate.name, wanted.version)
            if cached is not None:
                return await self._checked(cached, wanted.crate.name, wanted.version, client)
        try:
            record = await self.resolve(wanted)
        except NotFound as exc:  # the registry has no such crate or version
            return Failed(404, str(exc), result=MetricResult.NEGATIVE)
        except OfflineMiss as exc:
            return Failed(503, str(exc))
        except UpstreamError as exc:
            return Failed(exc.status, f"upstream error for the index of {wanted.crate.name}: {exc}")
        name, version = record.name, wanted.version
        if redirecting:
            location = await self.shared_url(record, version)
            if location is not None:
                return Redirect(location, {"X-Cache": CacheResult.HIT})
        cached = self.open_cached(name, version)  # asked with another case?
        if cached is None:
            cached = await self.adopt_unrecorded(record, version)
        if cached is not None:
            return await self._checked(cached, name, version, client)
        # The licence rule needs the crate's Cargo.toml: fetch and verify it whole before deciding. A
        # block known from name and version alone is decided (and counted) now, and nothing is fetched.
        licence_first = False
        if self.gate is not None:
            licence_first = not head and self.gate.needs_license(name, version)
            if not licence_first or self.gate.blocks(name, version):
                licence_first = False
                refusal = await self.gate.judge(name, version, client)
                if refusal is not None:
                    return Blocked(refusal.rule, refusal.reason)
        if self.offline:
            return Failed(503, f"offline and {name} {version} is not cached")
        headers = {**CRATE_HEADERS, "ETag": f'"{record.cksum}"', "X-Cache": CacheResult.MISS}
        if head:  # headers only: no reason to download the tarball now
            return HeadersOnly(headers)
        fill, joined = self.fill(record, version)
        if joined:
            self.metrics.coalesced.labels("crate").inc()
        fill.hold()  # keeps the spool readable until this client is done, even after the fill ends
        try:
            delivery = await self._from_fill(fill, name, version, headers, joined, licence_first, client)
        except BaseException:
            fill.release()
            raise
        if not isinstance(delivery, FromFill):
            fill.release()
        return delivery

    async def _from_fill(
        self,
        fill: Fill,
        name: str,
        version: str,
        headers: dict[str, str],
        joined: bool,
        licence_first: bool,
        client: str,
    ) -> Delivery:
        try:
            # Shielded: these futures are shared, and a client that leaves must not cancel them for all.
            await asyncio.shield(fill.started)
            if fill.content_length is None or fill.content_length <= VERIFY_BEFORE_SENDING or licence_first:
                await asyncio.shield(fill.finished)
        except UpstreamNotFound:
            return Failed(404, f"upstream has no tarball for {name} {version}")
        except UpstreamError as exc:
            return Failed(exc.status, f"upstream error for {name} {version}: {exc}")
        except Exception as exc:  # checksum mismatch, disk trouble: one line, never a traceback
            return Failed(502, str(exc))
        # One upstream fetch is one miss; whoever joined it (here, or by waiting on another worker
        # process's lock) is a coalesced hit.
        result = MetricResult.HIT if joined or fill.stored_elsewhere else MetricResult.MISS
        if not (fill.stored_elsewhere or licence_first):
            return FromFill(fill, headers, fill.release, result)
        # Stored by another worker process, or to be checked against the licence rule first: the file.
        if fill.stored_elsewhere and not joined:
            self.metrics.coalesced.labels("crate").inc()
        cached = self.open_cached(name, version)
        if cached is None:
            if licence_first:  # not stored (a full disk): its licence cannot be read
                return Failed(503, f"{name} {version} could not be stored to read its licence", result=result)
            return Failed(502, f"{name} {version} vanished from the cache", result=result)
        if licence_first:
            x_cache = CacheResult.HIT if joined or fill.stored_elsewhere else CacheResult.MISS
            return await self._checked(cached, name, version, client, x_cache, result)
        return self._from_store(cached, CacheResult.HIT, result)

    async def _checked(
        self,
        cached: CachedCrate,
        name: str,
        version: str,
        client: str,
        x_cache: CacheResult = CacheResult.HIT,
        result: MetricResult = MetricResult.HIT,
    ) -> Delivery:
        """A stored crate, unless the gate blocks it (its licence is read from it the first time)."""
        if self.gate is not None:
            if self.gate.needs_license(name, version):
                await self.gate.learn_license(name, version, cached.file)
            refusal = await self.gate.judge(name, version, client)
            if refusal is not None:
                cached.file.close()
                return Blocked(refusal.rule, refusal.reason, x_cache, result)
        return self._from_store(cached, x_cache, result)

    @staticmethod
    def _from_store(cached: CachedCrate, x_cache: CacheResult, result: MetricResult) -> FromFile:
        return FromFile(cached.file, cached.size, stored_headers(cached.sha256, x_cache), result)

    async def prefetch(self, crate: CrateName, body: bytes, version: str) -> None:
        """Fetch and store a version before a client asks (upstream.prefetch: crates); a client that
        asks meanwhile joins the fill."""
        record = await find_version_async(body, crate, version)
        if record is None or self.store.crate_path(record.name, version).exists():
            return
        if self.gate is not None and self.gate.blocks(record.name, version):
            return  # the same gate as a download: what it blocks is never fetched ahead either
        fill, _ = self.fill(record, version)
        await asyncio.shield(fill.finished)

    def fill(self, record: VersionRecord, version: str) -> tuple[Fill, bool]:
        """Start (or join) the download of a crate; returns the fill and whether it was joined."""
        key = f"{record.name}/{version}"
        active = self._active.get(key)
        if active is not None:
            return active, True
        fill = Fill(record.name, version, record.cksum)
        self._active[key] = fill

        async def run() -> None:
            try:
                await self._run_fill(fill)
            except BaseException as exc:
                fill.fail(exc)
                raise
            finally:
                self._active.pop(key, None)

        # SingleFlight keeps the task alive (and its error retrieved) even if every client leaves.
        task = asyncio.ensure_future(self._fills.run(key, run))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return fill, False

    async def _run_fill(self, fill: Fill) -> None:
        try:
            async with self.coordination.lock(crate_key(fill.name, fill.version)):
                cached = self.open_cached(fill.name, fill.version)
                if cached is not None:  # another worker process stored it while we waited
                    cached.file.close()
                    fill.stored_elsewhere = True
                    fill.succeed(cached.size)
                    return
                if await self._from_shared(fill):  # another replica stored it while we waited
                    return
                template = await self.index.dl_template()
                # static.crates.io expects '+' (build metadata) percent-encoded; names keep their case.
                url = expand_dl_template(template, fill.name, quote(fill.version, safe=""), fill.cksum)
                spool = fill.spool = Spool(self.store.new_temp_file())
                attempts = self.upstream.config.retries + 1
                for number in range(attempts):
                    try:
                        await self._download(fill, url, spool)
                        break
                    except BodyCutOff as exc:
                        # Nobody has been sent a byte yet: start over rather than fail the clients.
                        if fill.streamed or number + 1 >= attempts:
                            raise UpstreamError(str(exc), status=504 if exc.timeout else 502) from exc
                        log.warning("retrying %s %s: %s", fill.name, fill.version, exc)
                        spool.reset()
                await self._commit(fill, spool)
                await self._share(fill)  # before the lock goes: the replicas waiting on it look there
        finally:
            fill.release()

    async def shared_url(self, record: VersionRecord, version: str) -> str | None:
        """A short-lived URL of the crate in the shared storage, or None (not there, or unreachable)."""
        try:
            return await self.shared.crate_url(CrateVersion(CrateName(record.name), version), record.cksum)
        except Exception as exc:
            log.warning("shared storage: no URL for %s %s: %s", record.name, version, exc)
            return None

    async def _from_shared(self, fill: Fill) -> bool:
        """Copy the crate from the shared storage into this cache dir if it is there and verifies."""
        if isinstance(self.shared, LocalShared):
            return False
        temp = self.store.new_temp_file()
        key = CrateVersion(CrateName(fill.name), fill.version)
        try:
            size = await self.shared.fetch_crate(key, fill.cksum, temp, self.upstream.config.max_crate_size)
            if size is not None:
                meta = CrateMeta(fill.name, fill.version, fill.cksum, size, time.time())
                await asyncio.to_thread(self.store.commit_crate, temp, meta)
        except Exception as exc:  # the bucket or the disk failing: fetch upstream like a lone replica
            log.warning("shared storage: could not fetch %s %s: %s", fill.name, fill.version, exc)
            size = None
        if size is None:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            return False
        fill.stored_elsewhere = fill.from_shared = True
        fill.succeed(size)
        self._evict_if_full()  # the hot copy stays within cache.max_size
        return True

    async def _share(self, fill: Fill) -> None:
        """Upload what was just stored, verified, for the other replicas; failing costs only sharing."""
        if isinstance(self.shared, LocalShared):
            return
        key = CrateVersion(CrateName(fill.name), fill.version)
        upload = asyncio.ensure_future(
            self.shared.put_crate(key, self.store.crate_path(fill.name, fill.version), fill.cksum)
        )
        self._uploads.add(upload)
        upload.add_done_callback(self._uploads.discard)
        try:
            # Shielded: a fill cancelled at shutdown leaves its upload to close(), not half-done.
            await asyncio.shield(upload)
        except Exception as exc:
            log.warning("shared storage: could not store %s %s: %s", fill.name, fill.version, exc)

    async def _download(self, fill: Fill, url: str, spool: Spool) -> None:
        async with self.upstream.open_crate(url) as response:
            encoded = "Content-Encoding" in response.headers
            limit = self.upstream.config.max_crate_size
            if not encoded and response.content_length is not None and response.content_length > limit:
                raise TooLarge(self._too_large(fill, f"is {response.content_length} bytes"))
            fill.begin(None if encoded else response.content_length)
            hasher = hashlib.sha256()
            try:
                async for chunk in response.content.iter_chunked(CHUNK):
                    if spool.size + len(chunk) > limit:  # an endless body must not fill the disk
                        raise TooLarge(self._too_large(fill, "is larger than that"))
                    spool.write(chunk)
                    hasher.update(chunk)
                    fill.publish(spool.size - len(chunk))  # everything before this chunk
            except MemorySpoolFull as exc:
                raise UpstreamError(
                    f"{fill.name} {fill.version} does not fit in memory and the cache disk refuses it "
                    f"({spool.disk_error})",
                    status=503,
                ) from exc
            except TimeoutError as exc:
                raise BodyCutOff(f"upstream stalled mid-body for {fill.name} {fill.version}", True) from exc
            except aiohttp.ClientError as exc:
                raise BodyCutOff(f"upstream cut off {fill.name} {fill.version}: {exc}", False) from exc
        self.metrics.upstream_bytes.labels("crate").inc(spool.size)
        digest = hasher.hexdigest()
        if digest != fill.cksum:
            self.metrics.checksum_failures.inc()
            log.error(
                "checksum mismatch for %s %s from %s: index cksum %s, upstream bytes hash to %s "
                "(%d bytes); nothing stored",
                fill.name, fill.version, url, fill.cksum, digest, spool.size,
            )  # fmt: skip
            raise ChecksumMismatch(
                f"checksum mismatch for {fill.name} {fill.version}: the upstream bytes do not match "
                f"the index cksum"
            )

    def _too_large(self, fill: Fill, what: str) -> str:
        limit = self.upstream.config.max_crate_size
        log.warning("refusing %s %s: the upstream body %s (upstream.max_crate_size is %d bytes)",
                    fill.name, fill.version, what, limit)  # fmt: skip
        return f"{fill.name} {fill.version} is larger than upstream.max_crate_size ({limit} bytes)"

    async def _commit(self, fill: Fill, spool: Spool) -> None:
        """Make the file durable and rename it into place, in a batch with the fills that finished
        meanwhile, then answer; a disk that fails here costs the cache, not the answer."""
        size = spool.size
        if spool.disk_error is not None:
            self._store_failed(f"cannot write {fill.name} {fill.version} to the cache: {spool.disk_error}")
        if spool.on_disk:
            meta = CrateMeta(fill.name, fill.version, fill.cksum, size, time.time())
            try:
                spool.close()
                await self._commits.commit(spool.temp, meta)
            except (OSError, sqlite3.Error) as exc:
                self._store_failed(f"could not store {fill.name} {fill.version}: {exc}")
        fill.succeed(size)
        self._evict_if_full()

    def _evict_if_full(self) -> None:
        if self.store.crate_bytes() > self.max_size and (self._eviction is None or self._eviction.done()):
            self._eviction = asyncio.get_running_loop().create_task(self._evict())

    async def _evict(self) -> None:
        try:
            if self.store.eviction_running():  # another worker process is at it
                return
            target = low_water(self.max_size)
            # Fills that commit while a run ends see it still running and start none: look again.
            for _ in range(EVICTION_ROUNDS):
                async with self.store.eviction_lock():
                    report = await asyncio.to_thread(evict_to, self.store, target)
                self._sha_memo.clear()
                if report.removed_count:
                    log.info(
                        "evicted %d crates (%d bytes) to %d bytes, below cache.max_size (%d bytes)",
                        report.removed_count, report.removed_bytes, target, self.max_size,
                    )  # fmt: skip
                if self.store.crate_bytes() <= self.max_size:
                    break
        except (OSError, sqlite3.Error) as exc:
            log.error("eviction failed: %s", exc)

    def _store_failed(self, reason: str) -> None:
        self.disk_trouble.report(reason)
