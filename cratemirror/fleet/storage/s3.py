"""S3Shared: crates and index files in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, R2), through
aiobotocore. Tested against moto's S3 server; meant for MinIO/AWS/Ceph.

Layout under storage.s3.prefix:
  crates/<name>/<version, percent-encoded>.crate   body = the .crate; metadata sha256
  index/<lowercase name>                           body = the index file; metadata = its validators
  audit/<replica>/<epoch hour>.jsonl.gz            one replica's audit records of one hour (cache/audit.py)

Uploads are of verified temp files only, with their SHA-256 sent as the object checksum (the store
refuses bytes that do not match) and If-None-Match: * (a second writer of the same crate is refused:
the first copy stays). Downloads are hashed and dropped unless they match the index checksum: the
bucket is storage, not a trusted source.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote, unquote

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from cachetools import LRUCache

from cratemirror.config.schema import S3Config
from cratemirror.fleet.storage import CrateCopy, StoredCrate
from cratemirror.fleet.storage.disk import IndexEntry
from cratemirror.names import CrateName, CrateVersion, InvalidRequest, is_cksum, parse_crate_version

log = logging.getLogger("cratemirror.storage")
T = TypeVar("T")

CHUNK = 256 * 1024
PRESIGN_SECONDS = 300  # a redirect's URL is good for this long: enough to start the download
KNOWN_LIMIT = 100_000  # crates known to be in the bucket (they never change once stored)
MAX_LIST_PAGES = 100_000
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


def _ascii(value: str | None) -> str | None:
    """Object metadata travels in HTTP headers: ASCII only (an odd upstream validator is dropped)."""
    return value if value is not None and value.isascii() and value.isprintable() else None


class S3Shared:
    def __init__(self, config: S3Config, max_index_size: int, registry_prefix: str = "") -> None:
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
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
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

    async def usage(self) -> tuple[int, int]:
        return await self._tracked(self._usage())

    def iter_crates(self) -> AsyncIterator[StoredCrate]:
        return self._iter_crates()

    async def read_crate(self, key: CrateVersion, out: IO[bytes] | None, limit: int) -> CrateCopy | None:
        return await self._tracked(self._read_crate(key, out, limit))

    async def delete_crate(self, key: CrateVersion) -> None:
        await self._tracked(self._client.delete_object(Bucket=self.bucket, Key=self._crate_key(key)))
        self._known.pop(self._crate_key(key), None)

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
        await self._tracked(
            self._client.put_object(Bucket=self.bucket, Key=self._audit_key(replica, hour), Body=body)
        )

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
        try:
            response = await self._tracked(
                self._client.get_object(Bucket=self.bucket, Key=self._audit_key(replica, hour))
            )
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        if int(response.get("ContentLength", 0)) > limit:
            response["Body"].close()
            return None
        async with response["Body"] as stream:
            body = await stream.read(limit + 1)
        return bytes(body) if len(body) <= limit else None

    # ---- keys (from validated values only) --------------------------------------------------------

    def _crate_key(self, key: CrateVersion) -> str:
        return f"{self.prefix}crates/{key.crate.name}/{quote(key.version, safe='')}.crate"

    def _audit_key(self, replica: str, hour: int) -> str:
        if not _REPLICA_RE.fullmatch(replica) or not 0 <= hour < 10**9:
            raise ValueError("invalid audit object name")
        return f"{self.prefix}audit/{replica}/{hour:010d}.jsonl.gz"

    def _index_key(self, crate: CrateName) -> str:
        return f"{self.prefix}index/{crate.lower}"

    # ---- crates -----------------------------------------------------------------------------------

    async def _put_crate(self, key: CrateVersion, verified: Path, sha256: str) -> None:
        name = self._crate_key(key)
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        with open(verified, "rb") as body:
            try:
                await self._client.put_object(
                    Bucket=self.bucket, Key=name, Body=body, ChecksumSHA256=checksum,
                    ContentType="application/gzip", Metadata={"sha256": sha256}, IfNoneMatch="*",
                )  # fmt: skip
            except ClientError as exc:
                if _code(exc) not in _ALREADY:
                    raise
        self._known[name] = True

    async def _fetch_crate(self, key: CrateVersion, sha256: str, into: Path, limit: int) -> int | None:
        name = self._crate_key(key)
        with open(into, "wb") as out:
            copy = await self._read_crate(key, out, limit)
            if copy is None:
                return None
            if copy.too_large:
                log.error("%s in the bucket is larger than %d bytes: ignored", name, limit)
                return None
            if copy.sha256 != sha256:
                log.error("%s in the bucket does not hash to the index cksum %s: ignored", name, sha256)
                return None
            out.flush()
            os.fsync(out.fileno())  # the caller renames it into the cache: durable first
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
            if head.get("Metadata", {}).get("sha256") != sha256:
                return None  # not the bytes the index names: let the fill replace nothing, serve upstream's
            self._known[name] = True
        url = await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": name}, ExpiresIn=PRESIGN_SECONDS
        )
        return str(url)

    async def _read_crate(self, key: CrateVersion, out: IO[bytes] | None, limit: int) -> CrateCopy | None:
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=self._crate_key(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        recorded = response.get("Metadata", {}).get("sha256")
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
        recorded = recorded if is_cksum(recorded) else None
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

    # ---- index files ------------------------------------------------------------------------------

    async def _get_index(self, crate: CrateName) -> IndexEntry | None:
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=self._index_key(crate))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        meta = response.get("Metadata", {})
        length = int(response.get("ContentLength", 0))
        if length > self.max_index_size:
            response["Body"].close()
            return None
        async with response["Body"] as stream:
            body = await stream.read()
        try:
            checked_at = float(meta["checked-at"])
        except (KeyError, ValueError):
            return None
        if not math.isfinite(checked_at) or len(body) > self.max_index_size or not meta.get("etag"):
            return None
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
        await self._client.put_object(
            Bucket=self.bucket, Key=self._index_key(crate), Body=entry.body, Metadata=meta
        )

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
