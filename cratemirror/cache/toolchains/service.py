"""ToolchainService: rustup's dist server, pulled through, verified, cached; it decides, routes answer.

- A channel manifest is fetched with its `.asc` and kept only once the signature verifies against
  `toolchains.signing_key`; a manifest that does not is never served or stored, and the last good one
  keeps being served. Its `.sha256` is computed from the bytes served, so the two always agree.
  Moving names are revalidated after `toolchains.manifest_ttl`, with stale-while-revalidate and
  stale-if-error as for index files; dated manifests and X.Y.Z never change. Upstream 404s are
  remembered for `cache.negative_ttl`.
- A component is served only if a verified manifest names it, and its bytes must hash to the manifest's
  sha256 before the last byte reaches a client or the file is stored (crates.py's Fill and Spool: one
  upstream fetch per key, clients read the temp file as it grows, the newest chunk held back until the
  hash matched).
- rustup-init is checked against upstream's rustup-init.sha256 the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import io
import logging
import math
import re
import time
from collections.abc import Awaitable, Mapping

import aiohttp

from cratemirror.cache.crates import Fill
from cratemirror.cache.delivery import (
    CacheResult,
    Delivery,
    Failed,
    FromFile,
    FromFill,
    HeadersOnly,
    MetricResult,
)
from cratemirror.cache.singleflight import SingleFlight
from cratemirror.cache.spool import MemorySpoolFull, Spool
from cratemirror.cache.toolchains.files import StoredManifest, ToolchainFiles
from cratemirror.cache.toolchains.manifest import BadManifest, parse_manifest
from cratemirror.cache.toolchains.paths import Kind, ToolchainPath, manifest_candidates
from cratemirror.cache.toolchains.signature import BadSignature, SignatureVerifier
from cratemirror.config.schema import Config
from cratemirror.fleet.coordination import Coordination
from cratemirror.fleet.storage import LocalShared, SharedStorage
from cratemirror.fleet.storage.disk import DiskTrouble
from cratemirror.keys import toolchain_key
from cratemirror.metrics import Metrics, _NoGauge
from cratemirror.upstream.client import Health, TooLarge, Upstream, UpstreamError, UpstreamNotFound

log = logging.getLogger("cratemirror.toolchains")

KIND = "toolchain"
CHUNK = 256 * 1024
MAX_MANIFEST = 32 * 1024 * 1024  # a nightly channel manifest is ~1 MB
MAX_SMALL = 64 * 1024  # rustup-init.sha256, release-stable.toml
MAX_FILE = 2 * 1024 * 1024 * 1024  # one component (10-300 MB today)
# Up to this size a file is verified whole before its first byte goes out (a mismatch is a clean 502);
# larger ones stream while they arrive and a mismatch cuts the connection before the last byte.
VERIFY_BEFORE_SENDING = 4 * 1024 * 1024
_SHA256_RE = re.compile(rb"[0-9a-fA-F]{64}")

EVICTION_ROUNDS = 3  # files committed while an eviction runs are looked at by another round
CLOSE_WAIT = 10.0  # seconds close() gives background work (storing a verified manifest) to finish
IMMUTABLE = "public, max-age=31536000, immutable"
MOVING = "public, max-age=0, must-revalidate"


class NotNamed(Exception):
    """No verified manifest names this file: it is not served (404)."""


class ToolchainService:
    def __init__(
        self,
        config: Config,
        upstream: Upstream,
        metrics: Metrics,
        coordination: Coordination,
        disk_trouble: DiskTrouble,
        verifier: SignatureVerifier | None = None,
        shared: SharedStorage | None = None,
    ) -> None:
        self.files = ToolchainFiles(config.cache.dir / "toolchains")
        # storage.backend s3: components and rustup-init go to the bucket once verified, so the other
        # replicas take them from there (authenticated, and hashed against their own manifests)
        self.shared = shared or LocalShared()
        self._uploads: set[asyncio.Task[None]] = set()
        self.upstream = upstream
        self.metrics = metrics
        self.coordination = coordination
        self.disk_trouble = disk_trouble
        self.verifier = verifier or SignatureVerifier(config.toolchains.signing_key)
        self.offline = config.offline
        self.ttl = config.toolchains.manifest_ttl
        self.stale_while_revalidate = config.cache.stale_while_revalidate
        self.stale_if_error = config.cache.stale_if_error
        self.negative_ttl = config.cache.negative_ttl
        self.max_size = config.toolchains.max_size
        metrics.cache_max_size.labels("toolchain").set(self.max_size)  # the alert's bound for this kind
        # path -> the answer of the manifest refresh in progress (set once verified, before it is stored)
        self._refreshing: dict[str, asyncio.Future[StoredManifest | None]] = {}
        self._fills: SingleFlight[None] = SingleFlight()
        self._active: dict[str, Fill] = {}
        self._missing: dict[str, float] = {}  # path -> when upstream said 404
        self._hashes: dict[str, str] = {}  # component path -> sha256, from verified manifests
        self._parsed: dict[str, tuple[float, int]] = {}  # manifest path -> (mtime, size) read into _hashes
        self._background: set[asyncio.Task[object]] = set()
        self._eviction: asyncio.Task[None] | None = None
        self._evict_again = False

    async def start(self) -> None:
        """The keyring from the signing key, made now rather than on the first manifest (a failure
        here is logged; every manifest is then refused with the reason)."""
        try:
            await self.verifier.prepare()
        except BadSignature as exc:
            log.error("toolchain manifests cannot be verified: %s", exc)

    async def close(self) -> None:
        if self._uploads:
            await asyncio.wait(set(self._uploads), timeout=CLOSE_WAIT)
        if self._background:  # manifests being stored behind their answer, revalidations: let them end
            await asyncio.wait(set(self._background), timeout=CLOSE_WAIT)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._fills.cancel_all()
        if self._eviction is not None:
            await asyncio.wait({self._eviction}, timeout=30.0)
        self.verifier.close()

    # --- the decision --------------------------------------------------------------------------

    async def deliver(self, key: ToolchainPath, *, head: bool = False, ranged: bool = False) -> Delivery:
        """What to answer for one validated toolchain path."""
        if key.kind in (Kind.MANIFEST, Kind.MANIFEST_SHA256, Kind.MANIFEST_ASC):
            return await self._deliver_manifest(key)
        if key.kind is Kind.COMPONENT:
            try:
                digest = await self._component_hash(key)
            except NotNamed as exc:
                return Failed(404, str(exc), result=MetricResult.NEGATIVE)
            except UpstreamError as exc:
                return Failed(exc.status, str(exc))
            return await self._deliver_file(key, digest, head=head, ranged=ranged)
        if key.kind is Kind.RUSTUP_RELEASE:
            return await self._deliver_release(key)
        return await self._deliver_rustup_init(key, head=head, ranged=ranged)

    # --- manifests -----------------------------------------------------------------------------

    async def _deliver_manifest(self, key: ToolchainPath) -> Delivery:
        target = key.file
        got = await self.manifest(target)
        if isinstance(got, Failed):
            return got
        manifest, x_cache, result = got
        digest = hashlib.sha256(manifest.body).hexdigest()
        if key.kind is Kind.MANIFEST:
            body = manifest.body
            headers = {"Content-Type": "application/toml", "ETag": f'"{digest}"'}
        elif key.kind is Kind.MANIFEST_SHA256:
            body = f"{digest}  {target.name}\n".encode()
            headers = {"Content-Type": "text/plain"}
        else:
            body = manifest.signature
            headers = {"Content-Type": "application/pgp-signature"}
        headers["Cache-Control"] = MOVING if key.moving else IMMUTABLE
        headers["X-Cache"] = x_cache
        return FromFile(io.BytesIO(body), len(body), headers, result)

    async def manifest(self, key: ToolchainPath) -> tuple[StoredManifest, CacheResult, MetricResult] | Failed:
        """A verified manifest: from the cache while fresh, else revalidated (or stale, as allowed)."""
        stored = await asyncio.to_thread(self.files.read_manifest, key)
        now = time.time()
        age = now - stored.checked_at if stored is not None else math.inf
        if stored is not None and (not key.moving or self.offline or age < self.ttl):
            return stored, CacheResult.HIT, MetricResult.HIT
        if stored is not None and age < self.ttl + self.stale_while_revalidate:
            self._in_background(self._verified(key))
            return stored, CacheResult.STALE, MetricResult.STALE
        if self.offline:
            return Failed(503, f"offline and {key.path} is not cached", result=MetricResult.ERROR)
        if await self._known_missing(key.path, now):
            return Failed(404, f"upstream has no {key.path}", result=MetricResult.NEGATIVE)
        try:
            fetched = await self._verified(key)
        except (UpstreamError, BadSignature, BadManifest) as exc:
            status = exc.status if isinstance(exc, UpstreamError) else 502
            if stored is not None and age < self.ttl + self.stale_if_error:
                log.warning("serving the last good %s: %s", key.path, exc)
                return stored, CacheResult.STALE, MetricResult.STALE
            return Failed(status, str(exc))
        if fetched is None:
            return Failed(404, f"upstream has no {key.path}", result=MetricResult.NEGATIVE)
        if stored is not None:
            return fetched, CacheResult.REVALIDATED, MetricResult.REVALIDATED
        return fetched, CacheResult.MISS, MetricResult.MISS

    async def _verified(self, key: ToolchainPath) -> StoredManifest | None:
        """The manifest fresh from upstream and verified (None on a 404): one refresh per path in this
        process, answered as soon as the signature verified (storing it goes on behind the answer)."""
        ready = self._refreshing.get(key.path)
        if ready is None:
            ready = asyncio.get_running_loop().create_future()
            self._refreshing[key.path] = ready
            refresh = asyncio.ensure_future(self._refresh_manifest(key, ready))
            self._background.add(refresh)
            refresh.add_done_callback(lambda done: self._refreshed(key.path, ready, done))
        return await asyncio.shield(ready)

    def _refreshed(
        self, path: str, ready: asyncio.Future[StoredManifest | None], done: asyncio.Task[None]
    ) -> None:
        self._background.discard(done)
        if self._refreshing.get(path) is ready:
            del self._refreshing[path]
        if not ready.done():
            error = done.exception() if not done.cancelled() else None
            ready.set_exception(error or UpstreamError("the mirror is shutting down", 503))
            ready.exception()  # retrieved: a refresh nobody waits for is not an "unhandled" error

    async def _refresh_manifest(
        self, key: ToolchainPath, ready: asyncio.Future[StoredManifest | None]
    ) -> None:
        """Fetch, verify and store one manifest, once across workers and replicas (the lock is held
        until it is stored, so a worker waiting for it finds it on disk)."""
        started = time.time()
        async with self.coordination.lock(toolchain_key(key.path)):
            stored = await asyncio.to_thread(self.files.read_manifest, key)
            # Another worker did while we waited (or just before we looked): its copy is fresh.
            if stored is not None and (
                stored.checked_at >= started or not key.moving or time.time() - stored.checked_at < self.ttl
            ):
                ready.set_result(stored)
                return
            # Both at once: a manifest costs one upstream round trip, not two.
            fetch, signature = await asyncio.gather(
                self.upstream.fetch_index(key.path, None, None, kind=KIND),
                self.upstream.fetch_index(key.signature, None, None, kind=KIND),
            )
            if fetch.status == 404:
                await self._remember_missing(key.path)
                ready.set_result(None)
                return
            if signature.status == 404:
                raise BadSignature(f"{key.path}: upstream publishes no signature ({key.name}.asc)")
            try:
                await self.verifier.verify(fetch.body, signature.body, key.path)
            except BadSignature as exc:
                log.error("refusing %s from upstream: %s; nothing stored", key.path, exc)
                raise
            hashes = await asyncio.to_thread(parse_manifest, fetch.body, key.path)
            self._hashes.update(hashes.hashes)
            ready.set_result(StoredManifest(fetch.body, signature.body, time.time()))
            try:
                if stored is not None and stored.body == fetch.body and stored.signature == signature.body:
                    await asyncio.to_thread(self.files.confirm, key)
                else:
                    await asyncio.to_thread(self.files.store_manifest, key, fetch.body, signature.body)
            except OSError as exc:  # a sick disk costs the cache, not the answer
                self.disk_trouble.report(f"could not store {key.path}: {exc}")

    def _in_background(self, work: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(work)
        self._background.add(task)

        def done(finished: asyncio.Task[object]) -> None:
            self._background.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                log.warning("revalidation failed: %s", finished.exception())

        task.add_done_callback(done)

    async def _known_missing(self, path: str, now: float) -> bool:
        checked = self._missing.get(path)
        if checked is None:
            checked = await self.coordination.missing_since(toolchain_key(path))
        return checked is not None and now - checked < self.negative_ttl

    async def _remember_missing(self, path: str) -> None:
        now = time.time()
        if len(self._missing) > 65536:
            self._missing.clear()
        self._missing[path] = now
        await self.coordination.remember_missing(toolchain_key(path), now, self.negative_ttl)

    # --- components ----------------------------------------------------------------------------

    async def _component_hash(self, key: ToolchainPath) -> str:
        """The sha256 a verified manifest gives the component; fetches that date's manifest if needed."""
        digest = self._hashes.get(key.path)
        if digest is not None:
            return digest
        await asyncio.to_thread(self._read_stored_manifests, key.date)
        digest = self._hashes.get(key.path)
        if digest is not None:
            return digest
        if not self.offline:
            for candidate in manifest_candidates(key):
                got = await self.manifest(candidate)
                if isinstance(got, Failed) and got.status not in (404,):
                    reason = f"{key.path}: its manifest {candidate.path}: {got.reason}"
                    raise UpstreamError(reason, got.status)
                digest = self._hashes.get(key.path)
                if digest is not None:
                    return digest
        raise NotNamed(f"{key.path} is not named by any verified channel manifest")

    def _read_stored_manifests(self, date: str | None) -> None:
        """Load the hashes of the verified manifests on disk (another worker may have stored them)."""
        folders = [self.files.files_dir / "dist"]
        if date is not None:
            folders.append(self.files.files_dir / "dist" / date)
        for folder in folders:
            for path in folder.glob("channel-rust-*.toml"):
                try:
                    stat = path.stat()
                    relative = path.relative_to(self.files.files_dir).as_posix()
                    if self._parsed.get(relative) == (stat.st_mtime, stat.st_size):
                        continue
                    body = path.read_bytes()
                    hashes = parse_manifest(body, relative)
                except (OSError, BadManifest) as exc:
                    log.warning("skipping stored manifest %s: %s", path, exc)
                    continue
                self._parsed[relative] = (stat.st_mtime, stat.st_size)
                self._hashes.update(hashes.hashes)

    async def _deliver_file(self, key: ToolchainPath, digest: str, *, head: bool, ranged: bool) -> Delivery:
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{digest}"'}
        headers["Cache-Control"] = MOVING if key.moving else IMMUTABLE
        opened = self.files.open(key)
        if opened is not None:
            return FromFile(opened[0], opened[1], {**headers, "X-Cache": CacheResult.HIT}, MetricResult.HIT)
        if self.offline:
            return Failed(503, f"offline and {key.path} is not cached")
        if head:
            return HeadersOnly({**headers, "X-Cache": CacheResult.MISS}, MetricResult.MISS)
        fill, joined = self._fill(key, digest)
        if joined:
            self.metrics.coalesced.labels(KIND).inc()
        fill.hold()
        try:
            await asyncio.shield(fill.started)
            small = fill.content_length is None or fill.content_length <= VERIFY_BEFORE_SENDING
            if ranged or small or fill.stored_elsewhere:  # answered from the stored file
                await asyncio.shield(fill.finished)
        except UpstreamNotFound:
            fill.release()
            return Failed(404, f"upstream has no {key.path}")
        except UpstreamError as exc:
            fill.release()
            return Failed(exc.status, f"upstream error for {key.path}: {exc}")
        except Exception as exc:  # hash mismatch, disk trouble: one line
            fill.release()
            return Failed(502, str(exc))
        hit = joined or fill.stored_elsewhere
        result = MetricResult.HIT if hit else MetricResult.MISS
        x_cache = CacheResult.HIT if hit else CacheResult.MISS
        if ranged or small or fill.stored_elsewhere:
            opened = self.files.open(key)
            if opened is not None:
                fill.release()
                return FromFile(opened[0], opened[1], {**headers, "X-Cache": x_cache}, result)
            if fill.stored_elsewhere:
                fill.release()
                return Failed(502, f"{key.path} vanished from the cache")
            # Not stored (a full disk) or already evicted: the verified spool still holds every byte
            # (a range is then answered with the whole file, as HTTP allows).
        return FromFill(fill, {**headers, "X-Cache": x_cache}, fill.release, result)

    def _fill(self, key: ToolchainPath, digest: str) -> tuple[Fill, bool]:
        active = self._active.get(key.path)
        if active is not None:
            return active, True
        fill = Fill(key.path, "", digest)
        self._active[key.path] = fill

        async def run() -> None:
            try:
                await self._run_fill(key, fill)
            except BaseException as exc:
                fill.fail(exc)
                raise
            finally:
                self._active.pop(key.path, None)

        task = asyncio.ensure_future(self._fills.run(key.path, run))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return fill, False

    async def _run_fill(self, key: ToolchainPath, fill: Fill) -> None:
        try:
            async with self.coordination.lock(toolchain_key(key.path)):
                opened = self.files.open(key)
                if opened is not None:  # another worker stored it while we waited
                    opened[0].close()
                    fill.stored_elsewhere = True
                    fill.succeed(opened[1])
                    return
                if await self._from_shared(key, fill):  # another replica stored it in the bucket
                    return
                spool = fill.spool = Spool(self.files.new_temp_file())
                await self._download(key, fill, spool)
                await self._commit(key, fill, spool)
                await self._share(key, fill.cksum)  # before the lock goes: waiting replicas look there
        finally:
            fill.release()

    async def _from_shared(self, key: ToolchainPath, fill: Fill) -> bool:
        if isinstance(self.shared, LocalShared):
            return False
        temp = self.files.new_temp_file()
        try:
            size = await self.shared.fetch_toolchain(key.path, fill.cksum, temp, MAX_FILE)
            if size is not None:
                await asyncio.to_thread(self.files.commit, temp, self.files.path_of(key))
        except Exception as exc:  # the bucket or the disk failing: fetch upstream like a lone replica
            log.warning("shared storage: could not fetch %s: %s", key.path, exc)
            size = None
        finally:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
        if size is None:
            return False
        fill.stored_elsewhere = True
        fill.succeed(size)
        self._evict_if_full()
        return True

    async def _share(self, key: ToolchainPath, sha256: str) -> None:
        """Upload what was just stored, verified, for the other replicas; failing costs only sharing."""
        if isinstance(self.shared, LocalShared) or not self.files.path_of(key).exists():
            return
        upload = asyncio.ensure_future(self.shared.put_toolchain(key.path, self.files.path_of(key), sha256))
        self._uploads.add(upload)
        upload.add_done_callback(self._uploads.discard)
        try:
            await asyncio.shield(upload)  # a fill cancelled at shutdown leaves its upload to close()
        except Exception as exc:
            log.warning("shared storage: could not store %s: %s", key.path, exc)

    async def _download(self, key: ToolchainPath, fill: Fill, spool: Spool) -> None:
        url = f"{self.upstream.index_url}{key.path}"
        async with self.upstream.open_crate(url, kind=KIND) as response:
            encoded = "Content-Encoding" in response.headers
            if not encoded and response.content_length is not None and response.content_length > MAX_FILE:
                raise TooLarge(f"{key.path} is {response.content_length} bytes, over {MAX_FILE}")
            fill.begin(None if encoded else response.content_length)
            hasher = hashlib.sha256()
            pending = bytearray()  # what arrives in small pieces is written and hashed a CHUNK at a time

            def write(block: bytes | bytearray) -> None:
                spool.write(bytes(block))
                hasher.update(block)
                fill.publish(spool.size - len(block))  # the newest block waits for the hash

            try:
                async for chunk in response.content.iter_chunked(CHUNK):
                    if spool.size + len(pending) + len(chunk) > MAX_FILE:
                        raise TooLarge(f"{key.path} is larger than {MAX_FILE} bytes")
                    pending += chunk
                    if len(pending) >= CHUNK:
                        write(pending)
                        pending.clear()
                if pending:
                    write(pending)
            except MemorySpoolFull as exc:
                reason = f"{key.path} does not fit in memory and the disk refuses it"
                raise UpstreamError(reason, 503) from exc
            except TimeoutError as exc:
                raise UpstreamError(f"upstream stalled mid-body for {key.path}", 504) from exc
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"upstream cut off {key.path}: {exc}") from exc
        self.metrics.upstream_bytes.labels(KIND).inc(spool.size)
        digest = hasher.hexdigest()
        if digest != fill.cksum:
            self.metrics.checksum_failures.inc()
            log.error(
                "sha256 mismatch for %s: expected %s, upstream bytes hash to %s (%d bytes); nothing stored",
                key.path, fill.cksum, digest, spool.size,
            )  # fmt: skip
            raise UpstreamError(
                f"sha256 mismatch for {key.path}: the upstream bytes do not match the manifest's sha256"
            )
        # Verified: the clients may have the last chunk now, while the file is made durable and stored.
        fill.publish(spool.size)

    async def _commit(self, key: ToolchainPath, fill: Fill, spool: Spool) -> None:
        size = spool.size
        if spool.on_disk and spool.disk_error is None:
            try:
                spool.close()
                await asyncio.to_thread(self.files.commit, spool.temp, self.files.path_of(key))
            except OSError as exc:
                self.disk_trouble.report(f"could not store {key.path}: {exc}")
        fill.succeed(size)
        self._evict_if_full()

    def _evict_if_full(self) -> None:
        self._evict_again = True  # a run in progress looks again once it is done
        if self._eviction is None or self._eviction.done():
            self._eviction = asyncio.get_running_loop().create_task(self._evict_rounds())

    async def _evict_rounds(self) -> None:
        for _ in range(EVICTION_ROUNDS):
            if not self._evict_again:
                break
            self._evict_again = False
            await self._evict()

    async def record_usage(self) -> None:
        """cratemirror_cache_size_bytes / _entries{kind="toolchain"}: the components and rustup-init
        files toolchains.max_size bounds (manifests are a few MB at most); a walk of a few hundred files."""
        usage = await asyncio.to_thread(self.files.usage, True)
        self.metrics.cache_size.labels(KIND).set(usage.size)
        self.metrics.cache_entries.labels(KIND).set(usage.entries)

    async def _evict(self) -> None:
        try:
            removed, removed_bytes = await asyncio.to_thread(self.files.evict_to, self.max_size)
            await self.record_usage()
        except OSError as exc:
            log.error("toolchain eviction failed: %s", exc)
            return
        if removed:
            log.info("evicted %d toolchain files (%d bytes) below toolchains.max_size (%d bytes)",
                     removed, removed_bytes, self.max_size)  # fmt: skip

    # --- rustup ----------------------------------------------------------------------------------

    async def _deliver_rustup_init(self, key: ToolchainPath, *, head: bool, ranged: bool) -> Delivery:
        """rustup-init, checked against upstream's rustup-init.sha256 (fetched each time the file is
        fetched; for the moving rustup/dist/* names after manifest_ttl)."""
        target = key.file
        digest_key = ToolchainPath(f"{target.path}.sha256", Kind.RUSTUP_INIT_SHA256, target.moving)
        sidecar = self.files.path_of(digest_key)
        stored_digest: str | None = None
        fresh = False
        with contextlib.suppress(OSError):
            stored_digest = sidecar.read_text().strip()[:64]
            fresh = not target.moving or self.offline or time.time() - sidecar.stat().st_mtime < self.ttl
        if stored_digest is None or not fresh:
            if self.offline:
                return Failed(503, f"offline and {target.path} is not cached")
            try:
                fetch = await self.upstream.fetch_index(digest_key.path, None, None, kind=KIND)
            except UpstreamError as exc:
                if stored_digest is None:
                    return Failed(exc.status, str(exc))
                fetch = None
            if fetch is not None:
                if fetch.status == 404:
                    return Failed(404, f"upstream has no {digest_key.path}", result=MetricResult.NEGATIVE)
                match = _SHA256_RE.match(fetch.body[:MAX_SMALL].strip())
                if match is None:
                    return Failed(502, f"upstream's {digest_key.path} holds no sha256")
                new_digest = match.group(0).decode().lower()
                if new_digest != stored_digest:
                    await asyncio.to_thread(self.files.remove, target)
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(
                        self.files.write_atomic, sidecar, f"{new_digest}  {target.name}\n".encode()
                    )
                stored_digest = new_digest
        assert stored_digest is not None
        if key.kind is Kind.RUSTUP_INIT_SHA256:
            body = f"{stored_digest}  {target.name}\n".encode()
            headers = {"Content-Type": "text/plain", "Cache-Control": MOVING if key.moving else IMMUTABLE}
            return FromFile(
                io.BytesIO(body), len(body), {**headers, "X-Cache": CacheResult.HIT}, MetricResult.HIT
            )
        return await self._deliver_file(target, stored_digest, head=head, ranged=ranged)

    async def _deliver_release(self, key: ToolchainPath) -> Delivery:
        """rustup/release-stable.toml (unsigned upstream): passed through byte for byte, with a TTL."""
        path = self.files.path_of(key)
        body: bytes | None = None
        age = math.inf
        with contextlib.suppress(OSError):
            body = path.read_bytes()
            age = time.time() - path.stat().st_mtime
        if body is not None and (self.offline or age < self.ttl):
            return self._small(body, CacheResult.HIT, MetricResult.HIT)
        if self.offline:
            return Failed(503, f"offline and {key.path} is not cached")
        try:
            fetch = await self.upstream.fetch_index(key.path, None, None, kind=KIND)
        except UpstreamError as exc:
            if body is not None and age < self.ttl + self.stale_if_error:
                return self._small(body, CacheResult.STALE, MetricResult.STALE)
            return Failed(exc.status, str(exc))
        if fetch.status == 404:
            return Failed(404, f"upstream has no {key.path}", result=MetricResult.NEGATIVE)
        if len(fetch.body) > MAX_SMALL:
            return Failed(502, f"upstream's {key.path} is larger than {MAX_SMALL} bytes")
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.files.write_atomic, path, fetch.body)
        return self._small(
            fetch.body, CacheResult.MISS if body is None else CacheResult.REVALIDATED, MetricResult.MISS
        )

    @staticmethod
    def _small(body: bytes, x_cache: str, result: MetricResult) -> FromFile:
        headers: Mapping[str, str] = {
            "Content-Type": "application/toml",
            "Cache-Control": MOVING,
            "X-Cache": x_cache,
        }
        return FromFile(io.BytesIO(body), len(body), headers, result)

    def usage(self) -> tuple[int, int]:
        stored = self.files.usage()
        return stored.size, stored.entries


def build_toolchains(
    config: Config,
    metrics: Metrics,
    coordination: Coordination,
    disk_trouble: DiskTrouble,
    shared: SharedStorage | None = None,
) -> ToolchainService | None:
    """The service behind /toolchains/, or None when toolchains.upstream is null (routes off)."""
    if config.toolchains.upstream is None:
        return None
    upstream_config = config.upstream.model_copy(
        update={"index_url": config.toolchains.upstream + "/", "max_index_size": MAX_MANIFEST}
    )
    upstream = Upstream(upstream_config, metrics)
    # cratemirror_upstream_up describes crates.io (no labels in the contract): the dist server's health
    # is its own and shows in the upstream request counters (kind="toolchain").
    quiet = copy.copy(metrics)
    quiet.upstream_up = _NoGauge()
    upstream.health = Health(quiet)
    return ToolchainService(config, upstream, metrics, coordination, disk_trouble, shared=shared)
