"""S3Shared: crates and index files in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, R2), through
aiobotocore. Tested against moto's S3 server; meant for MinIO/AWS/Ceph.

Layout under storage.s3.prefix:
  crates/<name>/<version, percent-encoded>.crate   body = the .crate; metadata sha256, mac
  index/<lowercase name>                           body = the index file; metadata = its validators, mac
  audit/<replica>/<epoch hour>.jsonl.gz            one replica's audit records of an hour; mac
  first-seen/<lowercase name>                      when the fleet first saw each index line (cooldown); mac

Every object's metadata carries an HMAC-SHA256 made with storage.s3.integrity_key (integrity.py) over
its key, body and validators: the bucket is storage, not a trusted source. An object that fails
authentication, or a crate whose bytes do not hash to the authenticated sha256 (and to the index
checksum), is treated as absent: counted, logged once per key, and overwritten by the next fill.

Uploads are of verified temp files only, with their SHA-256 sent as the object checksum (the store
refuses bytes that do not match) and If-None-Match: * (a second writer of the same crate is refused:
the first copy stays, unless it fails authentication, then it is replaced).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote, unquote

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from cachetools import LRUCache

from cratemirror.config.schema import S3Config
from cratemirror.fleet.storage.disk import IndexEntry
from cratemirror.fleet.storage.integrity import ObjectKind, Sealer
from cratemirror.fleet.storage.seam import (
    CrateCopy,
    CrateRecord,
    IntegrityFailure,
    StoredCrate,
    Stray,
    VerifiedCrate,
)
from cratemirror.names import CrateName, CrateVersion, InvalidRequest, is_cksum, parse_crate_version

log = logging.getLogger("cratemirror.storage")
T = TypeVar("T")

CHUNK = 256 * 1024
PRESIGN_SECONDS = 300  # a redirect's URL is good for this long: enough to start the download
KNOWN_LIMIT = 100_000  # crates known to be in the bucket (they never change once stored)
HASH_IN_THREAD = 256 * 1024  # bytes: a larger index body is hashed off the event loop (~1.5 ms at 512 KiB)
REPORTED_LIMIT = 10_000  # keys whose failed authentication was logged (once each)
MAX_LIST_PAGES = 100_000
JOBS = 8  # deletes or uploads at once (the operator tools)
PROBLEM_MEMORY = (
    60.0  # seconds /readyz reports a failed call, unless one succeeds meanwhile  # usage(): 1000 keys a page
)
_REPLICA_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_AUDIT_KEY_RE = re.compile(r"([a-z0-9][a-z0-9-]{0,63})/(\d{10})\.jsonl\.gz")
_MISSING = {"NoSuchKey", "404", "NotFound"}
_ALREADY = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _parse_crate_key(rest: str) -> CrateVersion | None:
    """`<name>/<version, percent-encoded>.crate` back into a CrateVersion; None for any other key."""
    name, slash, file = rest.partition("/")
    if not slash or not file.endswith(".crate") or "/" in file:
        return None
    try:
        parsed = parse_crate_version(name, unquote(file[: -len(".crate")]))
    except InvalidRequest:
        return None
    return parsed if quote(parsed.version, safe="") == file[: -len(".crate")] else None


async def _sha256(body: bytes) -> str:
    """Hashing a file of many MiB would hold up every other request on this worker: a thread then."""
    if len(body) > HASH_IN_THREAD:
        return await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())
    return hashlib.sha256(body).hexdigest()


def _ascii(value: str | None) -> str | None:
    """Object metadata travels in HTTP headers: ASCII only (an odd upstream validator is dropped)."""
    return value if value is not None and value.isascii() and value.isprintable() else None


class S3Shared:
    def __init__(
        self,
        config: S3Config,
        max_index_size: int,
        registry_prefix: str = "",
        on_integrity_failure: IntegrityFailure | None = None,
    ) -> None:
        secret = config.integrity_secret()
        if secret is None:  # the config refuses backend s3 without it; this is for direct callers
            raise ValueError("storage.s3.integrity_key is required with storage.backend s3")
        self._sealer = Sealer(secret)
        self._on_integrity_failure = on_integrity_failure
        # Object keys whose failure was logged (once per key) and crates a fill must overwrite.
        self._reported: LRUCache[str, bool] = LRUCache(REPORTED_LIMIT)
        self._replace: LRUCache[str, bool] = LRUCache(REPORTED_LIMIT)
        self.config = config
        self.bucket = config.bucket or ""
        self.prefix = config.prefix + registry_prefix
        self.max_index_size = max_index_size
        self.redirects = config.serve == "redirect"
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._known: LRUCache[str, bool] = LRUCache(KNOWN_LIMIT)
        self._failed_at: float | None = None  # monotonic time of the last failed call, None after a success
        self._failure = ""
        self.skipped = 0  # objects iter_crates listed under crates/ but this mirror would not have written

    async def start(self) -> None:
        endpoint = str(self.config.endpoint_url) if self.config.endpoint_url is not None else None
        settings = AioConfig(
            signature_version="s3v4",
            # storage.s3.timeout per connect and per read (a stall mid-body too); one retry at most
            connect_timeout=self.config.timeout,
            read_timeout=self.config.timeout,
            retries={"max_attempts": 2, "mode": "standard"},
            # MinIO, Ceph and moto serve buckets under the path; AWS picks its own style.
            s3={"addressing_style": "path"} if endpoint else {},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = get_session()
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                region_name=self.config.region or "us-east-1",
                endpoint_url=endpoint,
                aws_access_key_id=self.config.access_key_id,
                aws_secret_access_key=self.config.secret_key(),
                config=settings,
            )
        )

    async def close(self) -> None:
        await self._stack.aclose()

    # ---- the seam: every call is tracked for /readyz ------------------------------------------------

    async def put_crate(self, key: CrateVersion, verified: Path, sha256: str) -> None:
        await self._tracked(self._put_crate(key, verified, sha256))

    async def fetch_crate(self, key: CrateVersion, sha256: str, into: Path, limit: int) -> int | None:
        return await self._tracked(self._fetch_crate(key, sha256, into, limit))

    async def crate_url(self, key: CrateVersion, sha256: str) -> str | None:
        return await self._tracked(self._crate_url(key, sha256))

    async def get_index(self, crate: CrateName) -> IndexEntry | None:
        return await self._tracked(self._get_index(crate))

    async def put_index(self, crate: CrateName, entry: IndexEntry) -> None:
        await self._tracked(self._put_index(crate, entry))

    async def put_toolchain(self, path: str, verified: Path, sha256: str) -> None:
        await self._tracked(self._put_toolchain(path, verified, sha256))

    async def fetch_toolchain(self, path: str, sha256: str, into: Path, limit: int) -> int | None:
        return await self._tracked(self._fetch_toolchain(path, sha256, into, limit))

    async def usage(self) -> tuple[int, int]:
        return await self._tracked(self._usage())

    def iter_crates(self) -> AsyncIterator[StoredCrate]:
        return self._iter_crates()

    async def read_crate(self, key: CrateVersion, out: IO[bytes] | None, limit: int) -> CrateCopy | None:
        return await self._tracked(self._read_crate(key, out, limit))

    async def delete_crate(self, key: CrateVersion) -> None:
        await self._tracked(self._client.delete_object(Bucket=self.bucket, Key=self._crate_key(key)))
        self._known.pop(self._crate_key(key), None)

    # ---- the operator tools' view (ArtifactStore) --------------------------------------------------

    async def list_crates(self, oldest_first: bool = False) -> AsyncIterator[StoredCrate]:
        """By key (grouped by name); oldest first needs the whole listing: about 100 bytes a crate."""
        if not oldest_first:
            async for item in self._iter_crates():
                yield item
            return
        listed = [item async for item in self._iter_crates()]
        listed.sort(key=lambda item: (item.recency, item.key.crate.name, item.key.version))
        for item in listed:
            yield item

    async def list_strays(self) -> AsyncIterator[Stray]:
        start = f"{self.prefix}crates/"
        async for key in self._list_keys(start):
            if _parse_crate_key(key[len(start) :]) is None:
                yield Stray(key[len(start) :], None)

    async def stat_crate(self, key: CrateVersion) -> CrateRecord | None:
        """The record is the authenticated sha256 only (None if it does not authenticate)."""
        name = self._crate_key(key)
        try:
            head = await self._tracked(self._client.head_object(Bucket=self.bucket, Key=name))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        recorded, _ = self._crate_record(name, head.get("Metadata", {}))
        modified = head.get("LastModified")
        stored_at = modified.timestamp() if modified is not None else 0.0
        return CrateRecord(key, recorded, True, stored_at)

    async def delete_crates(self, keys: Sequence[CrateVersion]) -> list[CrateVersion]:
        for start in range(0, len(keys), JOBS):
            await asyncio.gather(*(self.delete_crate(key) for key in keys[start : start + JOBS]))
        return list(keys)

    async def delete_stray(self, stray: Stray) -> bool:
        name = f"{self.prefix}crates/{stray.name}"
        await self._tracked(self._client.delete_object(Bucket=self.bucket, Key=name))
        return True

    def new_temp_file(self) -> Path:
        handle, name = tempfile.mkstemp(prefix="cratemirror-put-", suffix=".part")
        os.close(handle)  # the caller opens it by name
        return Path(name)

    async def put_crates(self, batch: Sequence[VerifiedCrate]) -> None:
        try:
            for start in range(0, len(batch), JOBS):
                chunk = batch[start : start + JOBS]
                await asyncio.gather(*(self.put_crate(item.key, item.path, item.sha256) for item in chunk))
        finally:
            for item in batch:
                with contextlib.suppress(FileNotFoundError):
                    item.path.unlink()

    def pruning(self) -> AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()  # the bucket has no eviction of its own to keep out

    async def _list_keys(self, start: str) -> AsyncIterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        number = 0
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for item in page.get("Contents", []):
                yield str(item.get("Key", ""))
            number += 1
            if number >= MAX_LIST_PAGES:
                break

    async def _tracked(self, work: Awaitable[T]) -> T:
        try:
            result = await work
        except Exception as exc:
            self._failed_at, self._failure = time.monotonic(), str(exc) or type(exc).__name__
            raise
        self._failed_at = None
        return result

    async def problem(self) -> str | None:
        if self._failed_at is None or time.monotonic() - self._failed_at > PROBLEM_MEMORY:
            return None
        return f"shared storage failing ({self._failure[:200]}); serving from this replica and upstream"

    async def put_audit(self, replica: str, hour: int, body: bytes) -> None:
        await self._put_sealed("audit", self._audit_key(replica, hour), body, "application/gzip")

    async def iter_audit(self, since_hour: int) -> AsyncIterator[tuple[str, int]]:
        """Audit objects whose key parses back into a replica name and an hour; others are skipped."""
        start = f"{self.prefix}audit/"
        paginator = self._client.get_paginator("list_objects_v2")
        number = 0
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for item in page.get("Contents", []):
                match = _AUDIT_KEY_RE.fullmatch(str(item.get("Key", ""))[len(start) :])
                if match is not None and int(match.group(2)) >= since_hour:
                    yield match.group(1), int(match.group(2))
            number += 1
            if number >= MAX_LIST_PAGES:
                break

    async def get_audit(self, replica: str, hour: int, limit: int) -> bytes | None:
        """The object's bytes if they authenticate with the fleet secret (else None, counted)."""
        return await self._get_sealed("audit", self._audit_key(replica, hour), limit, oversize_fails=False)

    async def put_first_seen(self, crate: CrateName, body: bytes) -> None:
        await self._put_sealed("first-seen", self._first_seen_key(crate), body, "application/json")

    async def get_first_seen(self, crate: CrateName, limit: int) -> bytes | None:
        """Replicas write at most `limit` bytes: a larger object is not theirs (counted like a bad MAC)."""
        return await self._get_sealed("first-seen", self._first_seen_key(crate), limit, oversize_fails=True)

    async def _put_sealed(self, kind: ObjectKind, name: str, body: bytes, content_type: str) -> None:
        """A small object whose key and body are all there is to authenticate (audit, first-seen)."""
        meta = self._sealer.seal(kind, name, await _sha256(body), {})
        await self._tracked(
            self._client.put_object(
                Bucket=self.bucket, Key=name, Body=body, ContentType=content_type, Metadata=meta
            )
        )
        self._passed(name)

    async def _get_sealed(
        self, kind: ObjectKind, name: str, limit: int, *, oversize_fails: bool
    ) -> bytes | None:
        """A small object's bytes if they authenticate (else None, counted); None if it is missing or
        larger than `limit` (counted too with `oversize_fails`)."""
        response = await self._tracked(self._get_object(name))
        if response is None:
            return None
        body: bytes | None = None
        if int(response.get("ContentLength", 0)) > limit:
            response["Body"].close()
        else:
            async with response["Body"] as stream:
                body = bytes(await stream.read(limit + 1))
        if body is None or len(body) > limit:
            if oversize_fails:
                self._failed(kind, name, f"more than {limit} bytes")
            return None
        problem = self._sealer.problem(kind, name, await _sha256(body), response.get("Metadata", {}))
        if problem is not None:
            self._failed(kind, name, problem)
            return None
        self._passed(name)
        return body

    # ---- keys (from validated values only) --------------------------------------------------------

    def _crate_key(self, key: CrateVersion) -> str:
        return f"{self.prefix}crates/{key.crate.name}/{quote(key.version, safe='')}.crate"

    def _audit_key(self, replica: str, hour: int) -> str:
        if not _REPLICA_RE.fullmatch(replica) or not 0 <= hour < 10**9:
            raise ValueError("invalid audit object name")
        return f"{self.prefix}audit/{replica}/{hour:010d}.jsonl.gz"

    def _index_key(self, crate: CrateName) -> str:
        return f"{self.prefix}index/{crate.lower}"

    def _first_seen_key(self, crate: CrateName) -> str:
        return f"{self.prefix}first-seen/{crate.lower}"

    # ---- authentication ---------------------------------------------------------------------------

    def _failed(self, kind: ObjectKind, name: str, reason: str) -> None:
        """An object that failed authentication or its hash: counted every time, logged once per key."""
        if self._on_integrity_failure is not None:
            self._on_integrity_failure(kind)
        if kind in ("crate", "toolchain"):
            self._replace[name] = True  # the next fill overwrites it, whatever If-None-Match says
        self._known.pop(name, None)
        if name not in self._reported:
            self._reported[name] = True
            then = {"audit": "", "first-seen": ", rewritten from this replica's times"}.get(
                kind, ", replaced from upstream"
            )
            log.error("shared storage: %s has %s: ignored%s", name, reason, then)

    def _passed(self, name: str) -> None:
        self._reported.pop(name, None)  # a later failure of this key is news again

    def _crate_record(self, name: str, meta: dict[str, str]) -> tuple[str | None, str | None]:
        """(the authenticated sha256, None) or (None, why the record does not authenticate)."""
        sha256 = meta.get("sha256")
        if not is_cksum(sha256):
            return None, "no valid sha256 recorded"
        problem = self._sealer.problem("crate", name, str(sha256), meta)
        return (None, problem) if problem is not None else (str(sha256), None)

    # ---- crates -----------------------------------------------------------------------------------

    async def _put_crate(self, key: CrateVersion, verified: Path, sha256: str) -> None:
        name = self._crate_key(key)
        overwrite = self._replace.pop(name, None) is not None
        if not await self._upload_crate(name, verified, sha256, overwrite=overwrite):
            # Someone stored it first: keep theirs only if it is ours to trust and the same bytes.
            try:
                head = await self._client.head_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if _code(exc) not in _MISSING:
                    raise
                head = None  # deleted meanwhile (a prune, verify --fix)
            recorded, problem = self._crate_record(name, head.get("Metadata", {}) if head else {})
            if recorded != sha256:
                if head is not None:
                    self._failed("crate", name, problem or f"a record for other bytes ({recorded})")
                    self._replace.pop(name, None)
                await self._upload_crate(name, verified, sha256, overwrite=True)
        self._passed(name)
        self._known[name] = True

    async def _upload_crate(self, name: str, verified: Path, sha256: str, *, overwrite: bool) -> bool:
        """Whether it was written (False: If-None-Match found an object there)."""
        written = await self._put_verified("crate", name, verified, sha256, "application/gzip", overwrite)
        if written and overwrite:
            log.warning("shared storage: %s replaced with verified bytes", name)
        return written

    async def _put_verified(
        self, kind: ObjectKind, name: str, verified: Path, sha256: str, content_type: str, overwrite: bool
    ) -> bool:
        """One verified file, sealed with the fleet secret; written once (If-None-Match) unless
        `overwrite`. Whether it was written (False: an object was already there)."""
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        meta = self._sealer.seal(kind, name, sha256, {"sha256": sha256})
        condition = {} if overwrite else {"IfNoneMatch": "*"}
        with open(verified, "rb") as body:
            try:
                await self._client.put_object(
                    Bucket=self.bucket, Key=name, Body=body, ChecksumSHA256=checksum,
                    ContentType=content_type, Metadata=meta, **condition,
                )  # fmt: skip
            except ClientError as exc:
                if _code(exc) not in _ALREADY:
                    raise
                return False
        return True

    async def _fetch_crate(self, key: CrateVersion, sha256: str, into: Path, limit: int) -> int | None:
        name = self._crate_key(key)
        with open(into, "wb") as out:
            copy = await self._read_crate(key, out, limit, sha256)
            if copy is None:
                return None
            if copy.recorded is None:
                return None  # failed authentication (counted and logged by _read_crate)
            if copy.recorded != sha256:
                # Authentic, but not what the (authenticated) index names: replaced by upstream's.
                self._replace[name] = True
                log.error("%s in the bucket is recorded as %s, not the index cksum %s: ignored",
                          name, copy.recorded, sha256)  # fmt: skip
                return None
            if copy.too_large:
                self._failed("crate", name, f"more than upstream.max_crate_size ({limit} bytes)")
                return None
            if copy.sha256 != copy.recorded:
                self._failed("crate", name, f"bytes that do not hash to its authenticated sha256 {sha256}")
                return None
            out.flush()
            os.fsync(out.fileno())  # the caller renames it into the cache: durable first
        self._passed(name)
        self._known[name] = True
        return copy.size

    async def _crate_url(self, key: CrateVersion, sha256: str) -> str | None:
        name = self._crate_key(key)
        if name not in self._known:
            try:
                head = await self._client.head_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return None
                raise
            recorded, problem = self._crate_record(name, head.get("Metadata", {}))
            if problem is not None:
                self._failed("crate", name, problem)
                return None  # never a URL for an unauthenticated record: the fill serves upstream's
            if recorded != sha256:
                self._replace[name] = True
                return None  # not the bytes the index names: the fill replaces them with upstream's
            self._passed(name)
            self._known[name] = True
        url = await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": name}, ExpiresIn=PRESIGN_SECONDS
        )
        return str(url)

    async def _read_crate(
        self, key: CrateVersion, out: IO[bytes] | None, limit: int, wanted: str | None = None
    ) -> CrateCopy | None:
        """`wanted`: the index cksum the caller needs; the body is not read if the record does not
        authenticate or names other bytes (then `sha256` is empty and `recorded` None or not `wanted`)."""
        name = self._crate_key(key)
        response = await self._get_object(name)
        if response is None:
            return None
        recorded, problem = self._crate_record(name, response.get("Metadata", {}))
        if problem is not None and wanted is not None:
            self._failed("crate", name, problem)  # serving; the tools (no `wanted`) report it themselves
        if wanted is not None and recorded != wanted:
            response["Body"].close()
            return CrateCopy(recorded, "", 0, False)
        hasher = hashlib.sha256()
        size = 0
        async with response["Body"] as stream:
            while chunk := await stream.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    break
                hasher.update(chunk)
                if out is not None:
                    out.write(chunk)
        return CrateCopy(recorded, hasher.hexdigest(), size, size > limit)

    async def _iter_crates(self) -> AsyncIterator[StoredCrate]:
        """ListObjectsV2 a page (1000 keys) at a time; keys parse back into validated names."""
        self.skipped = 0
        start = f"{self.prefix}crates/"
        paginator = self._client.get_paginator("list_objects_v2")
        number = 0
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for item in page.get("Contents", []):
                key = _parse_crate_key(str(item.get("Key", ""))[len(start) :])
                if key is None:
                    self.skipped += 1
                    continue
                modified = item.get("LastModified")
                stored_at = modified.timestamp() if modified is not None else 0.0
                yield StoredCrate(key, int(item.get("Size", 0)), stored_at)
            number += 1
            if number >= MAX_LIST_PAGES:
                break

    # ---- toolchain files (components, rustup-init) ------------------------------------------------

    async def _get_object(self, name: str) -> Any | None:
        """The object's GET response, or None when the bucket has no such key."""
        try:
            return await self._client.get_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise

    def _toolchain_key(self, path: str) -> str:
        return f"{self.prefix}toolchains/{path}"

    async def _put_toolchain(self, path: str, verified: Path, sha256: str) -> None:
        """Written once (If-None-Match); an object already there that does not authenticate as these
        bytes is overwritten."""
        name = self._toolchain_key(path)
        overwrite = self._replace.pop(name, None) is not None
        await self._put_verified("toolchain", name, verified, sha256, "application/octet-stream", overwrite)

    async def _fetch_toolchain(self, path: str, sha256: str, into: Path, limit: int) -> int | None:
        name = self._toolchain_key(path)
        response = await self._get_object(name)
        if response is None:
            return None
        meta = response.get("Metadata", {})
        problem = self._sealer.problem("toolchain", name, sha256, meta)
        if problem is not None or meta.get("sha256") != sha256:
            response["Body"].close()
            self._failed("toolchain", name, problem or "a record for other bytes")
            return None
        hasher = hashlib.sha256()
        size = 0
        with open(into, "wb") as out:
            async with response["Body"] as stream:
                while chunk := await stream.read(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        self._failed("toolchain", name, f"more than {limit} bytes")
                        return None
                    hasher.update(chunk)
                    out.write(chunk)
            if hasher.hexdigest() != sha256:
                self._failed(
                    "toolchain", name, f"bytes that do not hash to its authenticated sha256 {sha256}"
                )
                self._replace[name] = True
                return None
            out.flush()
            os.fsync(out.fileno())  # the caller renames it into the cache: durable first
        self._passed(name)
        return size

    # ---- index files ------------------------------------------------------------------------------

    async def _get_index(self, crate: CrateName) -> IndexEntry | None:
        name = self._index_key(crate)
        response = await self._get_object(name)
        if response is None:
            return None
        meta = response.get("Metadata", {})
        length = int(response.get("ContentLength", 0))
        if length > self.max_index_size:
            response["Body"].close()
            self._failed("index", name, f"more than upstream.max_index_size ({self.max_index_size} bytes)")
            return None
        parts: list[bytes] = []
        size = 0
        async with response["Body"] as stream:
            while (chunk := await stream.read(CHUNK)) and size <= self.max_index_size:
                size += len(chunk)  # read(n) returns at most n bytes: loop to the end
                parts.append(chunk)
        body = b"".join(parts)
        if size > self.max_index_size:
            self._failed("index", name, f"more than upstream.max_index_size ({self.max_index_size} bytes)")
            return None
        problem = self._sealer.problem("index", name, await _sha256(body), meta)
        if problem is not None:
            self._failed("index", name, problem)
            return None
        try:
            checked_at = float(meta["checked-at"])
        except (KeyError, ValueError):
            return None
        if not math.isfinite(checked_at) or not meta.get("etag"):
            return None
        self._passed(name)
        return IndexEntry(
            200, body, meta["etag"], meta.get("last-modified", ""), checked_at,
            meta.get("upstream-etag") or None, meta.get("upstream-last-modified") or None,
        )  # fmt: skip

    async def _put_index(self, crate: CrateName, entry: IndexEntry) -> None:
        if entry.status != 200:
            return  # "not found" is shared through coordination, with its own expiry
        meta = {
            "etag": entry.etag,
            "last-modified": entry.last_modified,
            "checked-at": repr(entry.checked_at),
            "upstream-etag": _ascii(entry.upstream_etag) or "",
            "upstream-last-modified": _ascii(entry.upstream_last_modified) or "",
        }
        name = self._index_key(crate)
        sealed = self._sealer.seal("index", name, await _sha256(entry.body), meta)
        await self._client.put_object(Bucket=self.bucket, Key=name, Body=entry.body, Metadata=sealed)
        self._passed(name)

    async def _usage(self) -> tuple[int, int]:
        total = count = 0
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}crates/")
        number = 0
        async for page in pages:
            for item in page.get("Contents", []):
                total += int(item.get("Size", 0))
                count += 1
            number += 1
            if number >= MAX_LIST_PAGES:
                break
        return total, count
