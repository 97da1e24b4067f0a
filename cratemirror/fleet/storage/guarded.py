"""GuardedShared: the bucket behind a time bound and a breaker, so a stalled bucket costs seconds.

Wraps any SharedStorage (the S3 one) for the server's fills:

- Every lookup (get_index, crate_url) has `storage.s3.timeout` in all; crate bodies are bounded by the
  same timeout per stall (the S3 client's connect and read timeouts) rather than in total.
- The first failure or timeout trips the breaker: the bucket is *degraded*, and the calls still in
  flight give up at once. Until a background probe
  (one small GET a second, bounded by the timeout) gets an answer, nothing waits on it: lookups answer
  "not there" at once (the replica serves its hot copy and fetches from upstream), index files are not
  shared, and verified fills stay in the hot copy with their key remembered.
- When the probe answers, the breaker closes and the replica uploads from its hot copies what it
  filled meanwhile, then every hot copy the bucket no longer lists (a bucket that lost its data).
- `problem()` (for /readyz) and the `cratemirror_storage_up` gauge read the breaker: no I/O.

The operator tools (iter_crates, read_crate, delete_crate, usage, iter_audit, get_audit) pass straight
through: they want the bucket's real errors, not a degraded view. put_audit, put_first_seen and
get_first_seen raise while degraded (within the timeout otherwise): their callers must tell "not done"
or "not known" from "absent" (the audit log keeps the hour for its next round; the cooldown merges with
the fleet on a later copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, TypeVar

from cratemirror.conditions import LastingCondition
from cratemirror.fleet.storage import CrateCopy, SharedStorage, StoredCrate
from cratemirror.fleet.storage.disk import IndexEntry, Store
from cratemirror.names import CrateName, CrateVersion, InvalidRequest, parse_crate_version

log = logging.getLogger("cratemirror.storage")
T = TypeVar("T")

PROBE_EVERY = 1.0  # seconds between probes of a degraded bucket
PROBE_NAME = CrateName("cratemirror-probe")  # an index key read (usually absent) as the probe
PENDING_LIMIT = (
    10_000  # fills remembered for upload while the bucket is degraded (then the refill finds them)
)
REFILL_LIMIT = 200_000  # hot copies compared with the bucket's listing after a recovery
REFILL_AT_ONCE = 4  # uploads in flight during a refill
REASON_LIMIT = 200


class StorageDegraded(Exception):
    """The bucket is degraded: a write whose caller must know it did not happen (the audit upload)."""


class GuardedShared:
    def __init__(
        self, inner: SharedStorage, timeout: float, store: Store, set_up: Callable[[int], None]
    ) -> None:
        self.inner = inner
        self.timeout = timeout
        self.store = store
        self._set_up = set_up
        self._down_since: float | None = None  # monotonic time the breaker opened
        self._reason = ""
        self._tripped = asyncio.Event()
        self._pending: dict[CrateVersion, str] = {}  # fills kept for upload: key -> sha256
        self._watch: asyncio.Task[None] | None = None
        self._refill: asyncio.Task[None] | None = None
        self._condition = LastingCondition(
            log, "shared storage degraded, serving from this replica and upstream"
        )
        self.refilled = 0  # hot copies uploaded after recoveries (for the tests and the bench)
        set_up(1)

    @property
    def redirects(self) -> bool:
        return self.inner.redirects

    @property
    def degraded(self) -> bool:
        return self._down_since is not None

    async def start(self) -> None:
        await self.inner.start()
        self._watch = asyncio.get_running_loop().create_task(self._probe_while_down())

    async def close(self) -> None:
        for task in (self._watch, self._refill):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.inner.close()

    # ---- the breaker --------------------------------------------------------------------------------

    def _trip(self, exc: BaseException) -> None:
        reason = (str(exc) or type(exc).__name__).replace("\n", " ")[:REASON_LIMIT]
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {self.timeout:g}s (storage.s3.timeout)"
        self._reason = reason
        self._condition.happened(reason)
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._set_up(0)
            self._tripped.set()

    def _recovered(self) -> None:
        if self._down_since is None:
            return
        self._condition.ended("the bucket answers again; uploading what was filled meanwhile")
        self._down_since = None
        self._tripped.clear()
        self._set_up(1)
        if self._refill is None or self._refill.done():
            self._refill = asyncio.get_running_loop().create_task(self._upload_hot_copies())

    async def _bounded(self, work: Awaitable[T], total: bool = True) -> T:
        """`work` within storage.s3.timeout (total=False: the S3 client's per-stall timeouts bound it)."""
        if not total:
            return await work
        async with asyncio.timeout(self.timeout):
            return await work

    async def _guarded(self, work: Callable[[], Awaitable[T]], default: T, total: bool = True) -> T:
        """`work` unless the bucket is degraded; a call in flight when another one trips the breaker
        gives up at once rather than wait out its own timeout."""
        if self._down_since is not None:
            return default
        call = asyncio.ensure_future(self._bounded(work(), total))
        tripped = asyncio.ensure_future(self._tripped.wait())
        try:
            await asyncio.wait({call, tripped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            tripped.cancel()
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await call
        if call.cancelled():
            return default
        try:
            return call.result()
        except Exception as exc:
            self._trip(exc)
            return default

    async def _probe_while_down(self) -> None:
        while True:
            await self._tripped.wait()
            await asyncio.sleep(PROBE_EVERY)
            try:
                await self._bounded(self.inner.get_index(PROBE_NAME))
            except Exception as exc:
                self._trip(exc)
                continue
            self._recovered()

    async def problem(self) -> str | None:
        if self._down_since is None:
            return None
        return (
            f"shared storage degraded for {time.monotonic() - self._down_since:.0f}s ({self._reason}); "
            f"serving from this replica and upstream"
        )

    # ---- the seam -------------------------------------------------------------------------------------

    async def put_crate(self, key: CrateVersion, verified: Path, sha256: str) -> None:
        if self._down_since is None:
            try:
                await self._bounded(self.inner.put_crate(key, verified, sha256), total=False)
                return
            except Exception as exc:
                self._trip(exc)
        if len(self._pending) < PENDING_LIMIT:
            self._pending[key] = sha256  # the hot copy goes up when the bucket is back

    async def fetch_crate(self, key: CrateVersion, sha256: str, into: Path, limit: int) -> int | None:
        return await self._guarded(
            lambda: self.inner.fetch_crate(key, sha256, into, limit), None, total=False
        )

    async def crate_url(self, key: CrateVersion, sha256: str) -> str | None:
        return await self._guarded(lambda: self.inner.crate_url(key, sha256), None)

    async def get_index(self, crate: CrateName) -> IndexEntry | None:
        return await self._guarded(lambda: self.inner.get_index(crate), None)

    async def put_index(self, crate: CrateName, entry: IndexEntry) -> None:
        await self._guarded(lambda: self.inner.put_index(crate, entry), None)

    async def put_toolchain(self, path: str, verified: Path, sha256: str) -> None:
        """Not kept for later while degraded (unlike crates): the next replica to fetch it shares it."""
        await self._guarded(lambda: self.inner.put_toolchain(path, verified, sha256), None, total=False)

    async def fetch_toolchain(self, path: str, sha256: str, into: Path, limit: int) -> int | None:
        return await self._guarded(
            lambda: self.inner.fetch_toolchain(path, sha256, into, limit), None, total=False
        )

    async def _strict(self, work: Callable[[], Awaitable[T]]) -> T:
        """`work` within the timeout, for a caller that must know it did not happen: raises while
        degraded, and when it fails (which trips the breaker)."""
        if self._down_since is not None:
            raise StorageDegraded(f"shared storage degraded: {self._reason}")
        try:
            return await self._bounded(work())
        except Exception as exc:
            self._trip(exc)
            raise

    async def put_audit(self, replica: str, hour: int, body: bytes) -> None:
        """Raises while degraded (the audit log keeps the hour and uploads it on a later round)."""
        await self._strict(lambda: self.inner.put_audit(replica, hour, body))

    async def put_first_seen(self, crate: CrateName, body: bytes) -> None:
        """Raises while degraded (the cooldown merges again on a later copy of the index file)."""
        await self._strict(lambda: self.inner.put_first_seen(crate, body))

    async def get_first_seen(self, crate: CrateName, limit: int) -> bytes | None:
        """Raises while degraded: "not known" is not "absent" to the cooldown."""
        return await self._strict(lambda: self.inner.get_first_seen(crate, limit))

    def iter_audit(self, since_hour: int) -> AsyncIterator[tuple[str, int]]:
        return self.inner.iter_audit(since_hour)

    async def get_audit(self, replica: str, hour: int, limit: int) -> bytes | None:
        return await self.inner.get_audit(replica, hour, limit)

    async def usage(self) -> tuple[int, int]:
        return await self.inner.usage()

    def iter_crates(self) -> AsyncIterator[StoredCrate]:
        return self.inner.iter_crates()

    async def read_crate(self, key: CrateVersion, out: IO[bytes] | None, limit: int) -> CrateCopy | None:
        return await self.inner.read_crate(key, out, limit)

    async def delete_crate(self, key: CrateVersion) -> None:
        await self.inner.delete_crate(key)

    # ---- after a recovery: the bucket gets the hot copies it lacks -------------------------------------

    async def _upload_hot_copies(self) -> None:
        try:
            pending, self._pending = self._pending, {}
            uploaded = await self._upload(pending)
            stored: set[CrateVersion] = set()
            async with asyncio.timeout(max(60.0, self.timeout * 20)):
                async for crate in self.inner.iter_crates():
                    stored.add(crate.key)
                    if len(stored) >= REFILL_LIMIT:
                        break
            hot = await asyncio.to_thread(self._hot_copies)
            missing = {key: sha for key, sha in hot.items() if key not in stored and key not in uploaded}
            uploaded |= await self._upload(missing)
            if uploaded:
                log.info("shared storage: uploaded %d crates from this replica's hot copy", len(uploaded))
        except Exception as exc:  # the bucket failing again: the breaker (or the next recovery) goes on
            self._trip(exc)

    def _hot_copies(self) -> dict[CrateVersion, str]:
        hot: dict[CrateVersion, str] = {}
        for meta in self.store.iter_crate_metas():
            if len(hot) >= REFILL_LIMIT:
                break
            try:
                key = parse_crate_version(meta.name, meta.version)
            except InvalidRequest:
                continue
            hot[key] = meta.sha256
        return hot

    async def _upload(self, crates: dict[CrateVersion, str]) -> set[CrateVersion]:
        done: set[CrateVersion] = set()
        gate = asyncio.Semaphore(REFILL_AT_ONCE)

        async def one(key: CrateVersion, sha256: str) -> None:
            path = self.store.crate_path(key.crate.name, key.version)
            async with gate:
                if self._down_since is not None:
                    self._pending.setdefault(key, sha256)
                    return
                if not path.exists():
                    return  # evicted meanwhile: nothing to upload
                try:
                    await self.inner.put_crate(key, path, sha256)
                except FileNotFoundError:
                    return
                except Exception as exc:
                    self._pending.setdefault(key, sha256)
                    self._trip(exc)
                    return
                done.add(key)
                self.refilled += 1

        await asyncio.gather(*(one(key, sha) for key, sha in crates.items()))
        return done
