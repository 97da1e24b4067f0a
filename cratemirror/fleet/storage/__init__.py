"""Storage shared by the replicas of a fleet, behind one narrow, domain-shaped seam.

Every replica keeps its own cache dir (cache.dir: temp files and a hot copy bounded by
cache.max_size, evicted as before). `SharedStorage` is what the replicas have in common:

- `LocalShared` (storage.backend: local): nothing beyond the cache dir; every call is a no-op.
- `S3Shared` (storage.backend: s3): crates and index files in an S3-compatible bucket, so what one
  replica stored every other one serves without asking upstream.

Keys are the validated value objects of names.py (CrateVersion, CrateName): no backend ever sees raw
request or upstream text. Crates go up only as verified temp files, come down only if they hash to
the checksum the index gives.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from cratemirror.metrics import DEFAULT_REGISTRY
from cratemirror.names import CrateName, CrateVersion

if TYPE_CHECKING:
    from cratemirror.config.schema import StorageConfig
    from cratemirror.fleet.storage.disk import IndexEntry

__all__ = ["CrateCopy", "LocalShared", "SharedStorage", "StoredCrate", "make_shared_storage"]


@dataclass(frozen=True, slots=True)
class StoredCrate:
    """A crate object as listed by the store (for the operator tools: verify, prune, export)."""

    key: CrateVersion
    size: int
    stored_at: float  # when it was written (S3: LastModified; the store keeps no access time)


@dataclass(frozen=True, slots=True)
class CrateCopy:
    """What `read_crate` saw: the sha256 recorded with the object and what its bytes hash to."""

    recorded: str | None
    sha256: str
    size: int
    too_large: bool  # stopped reading past the limit: `sha256` covers only a prefix


class SharedStorage(Protocol):
    @property
    def redirects(self) -> bool:
        """Whether downloads are answered with a redirect to the store (storage.s3.serve: redirect)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def put_crate(self, key: CrateVersion, verified: Path, sha256: str) -> None:
        """Store a crate file whose bytes hash to `sha256` (checked by the caller)."""
        ...

    async def fetch_crate(self, key: CrateVersion, sha256: str, into: Path, limit: int) -> int | None:
        """Copy the stored crate into `into` if it is there and hashes to `sha256`: its size, else None."""
        ...

    async def crate_url(self, key: CrateVersion, sha256: str) -> str | None:
        """A short-lived URL the client can download the stored crate from, or None if not stored."""
        ...

    async def get_index(self, crate: CrateName) -> IndexEntry | None: ...

    async def put_index(self, crate: CrateName, entry: IndexEntry) -> None: ...

    async def usage(self) -> tuple[int, int]:
        """(bytes, crate files) stored."""
        ...

    def iter_crates(self) -> AsyncIterator[StoredCrate]:
        """Every stored crate object whose key this mirror would have written, a listing page at a time;
        `skipped` then counts the others."""
        ...

    async def read_crate(self, key: CrateVersion, out: IO[bytes] | None, limit: int) -> CrateCopy | None:
        """Stream the stored crate through SHA-256 (into `out` if given): None if it is not stored."""
        ...

    async def delete_crate(self, key: CrateVersion) -> None: ...

    async def problem(self) -> str | None:
        """None while the store answers, else a one-line reason (/readyz: degraded)."""
        ...

    async def put_audit(self, replica: str, hour: int, body: bytes) -> None:
        """One replica's audit records of one hour (epoch hours), replacing an earlier upload."""
        ...

    def iter_audit(self, since_hour: int) -> AsyncIterator[tuple[str, int]]:
        """(replica, hour) of every audit object from `since_hour` on."""
        ...

    async def get_audit(self, replica: str, hour: int, limit: int) -> bytes | None:
        """An audit object's bytes; None if it is missing or larger than `limit`."""
        ...


class LocalShared:
    """storage.backend: local: nothing is shared beyond the cache dir."""

    redirects = False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def put_crate(self, key: CrateVersion, verified: Path, sha256: str) -> None:
        return None

    async def fetch_crate(self, key: CrateVersion, sha256: str, into: Path, limit: int) -> int | None:
        return None

    async def crate_url(self, key: CrateVersion, sha256: str) -> str | None:
        return None

    async def get_index(self, crate: CrateName) -> IndexEntry | None:
        return None

    async def put_index(self, crate: CrateName, entry: IndexEntry) -> None:
        return None

    async def usage(self) -> tuple[int, int]:
        return 0, 0

    async def iter_crates(self) -> AsyncIterator[StoredCrate]:
        nothing: tuple[StoredCrate, ...] = ()
        for crate in nothing:
            yield crate

    async def read_crate(self, key: CrateVersion, out: IO[bytes] | None, limit: int) -> CrateCopy | None:
        return None

    async def delete_crate(self, key: CrateVersion) -> None:
        return None

    async def problem(self) -> str | None:
        return None

    async def put_audit(self, replica: str, hour: int, body: bytes) -> None:
        return None

    async def iter_audit(self, since_hour: int) -> AsyncIterator[tuple[str, int]]:
        nothing: tuple[tuple[str, int], ...] = ()
        for item in nothing:
            yield item

    async def get_audit(self, replica: str, hour: int, limit: int) -> bytes | None:
        return None


def make_shared_storage(
    config: StorageConfig, max_index_size: int, registry: str = DEFAULT_REGISTRY
) -> SharedStorage:
    """crates.io's objects sit at the top of storage.s3.prefix, an extra registry's in registries/NAME/."""
    if config.backend == "local":
        return LocalShared()
    # The config refuses backend s3 when the `fleet` extra is missing; this is for direct callers.
    if importlib.util.find_spec("aiobotocore") is None:
        raise RuntimeError("storage.backend s3 needs the extra cratemirror[fleet]")
    from cratemirror.fleet.storage.s3 import S3Shared

    prefix = "" if registry == DEFAULT_REGISTRY else f"registries/{registry}/"
    return S3Shared(config.s3, max_index_size, prefix)
