"""Storage shared by the replicas of a fleet, behind one narrow, domain-shaped seam.

Every replica keeps its own cache dir (cache.dir: temp files and a hot copy bounded by
cache.max_size, evicted as before). `SharedStorage` is what the replicas have in common:

- `LocalShared` (storage.backend: local): nothing beyond the cache dir; every call is a no-op.
- `S3Shared` (storage.backend: s3): crates and index files in an S3-compatible bucket, so what one
  replica stored every other one serves without asking upstream.

Keys are the validated value objects of names.py (CrateVersion, CrateName): no backend ever sees raw
request or upstream text. Crates go up only as verified temp files, come down only if they hash to
the checksum the index gives. What comes down from a bucket is authenticated with the fleet secret
(integrity.py): an object that fails is treated as absent, reported through `on_integrity_failure`.

`ArtifactStore` is the operator tools' view of one registry's stored artifacts, on either backend
(`DiskArtifacts` over a cache dir, `S3Shared` over the bucket): per kind (crates, index files) list,
read, stat, delete and put-verified. Another artifact kind joins with methods of its own kind.
The values and interfaces live in seam.py (re-exported here), so a backend never imports this package.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from cratemirror.fleet.storage.seam import (
    ArtifactStore,
    CrateCopy,
    CrateRecord,
    IntegrityFailure,
    SharedStorage,
    StoredCrate,
    Stray,
    VerifiedCrate,
)
from cratemirror.names import DEFAULT_REGISTRY, CrateName, CrateVersion

if TYPE_CHECKING:
    from cratemirror.config.schema import StorageConfig
    from cratemirror.fleet.storage.disk import IndexEntry
    from cratemirror.fleet.storage.s3 import S3Shared

__all__ = [
    "ArtifactStore",
    "CrateCopy",
    "CrateRecord",
    "IntegrityFailure",
    "LocalShared",
    "SharedStorage",
    "StoredCrate",
    "Stray",
    "VerifiedCrate",
    "make_bucket_store",
    "make_shared_storage",
]


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

    async def put_toolchain(self, path: str, verified: Path, sha256: str) -> None:
        return None

    async def fetch_toolchain(self, path: str, sha256: str, into: Path, limit: int) -> int | None:
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

    async def put_first_seen(self, crate: CrateName, body: bytes) -> None:
        return None

    async def get_first_seen(self, crate: CrateName, limit: int) -> bytes | None:
        return None


def make_shared_storage(
    config: StorageConfig,
    max_index_size: int,
    registry: str = DEFAULT_REGISTRY,
    on_integrity_failure: IntegrityFailure | None = None,
) -> SharedStorage:
    """crates.io's objects sit at the top of storage.s3.prefix, an extra registry's in registries/NAME/."""
    if config.backend == "local":
        return LocalShared()
    return make_bucket_store(config, max_index_size, registry, on_integrity_failure)


def make_bucket_store(
    config: StorageConfig,
    max_index_size: int,
    registry: str = DEFAULT_REGISTRY,
    on_integrity_failure: IntegrityFailure | None = None,
) -> S3Shared:
    """One registry's part of the bucket (storage.backend s3): its SharedStorage and its ArtifactStore."""
    # The config refuses backend s3 when the `fleet` extra is missing; this is for direct callers.
    if importlib.util.find_spec("aiobotocore") is None:
        raise RuntimeError("storage.backend s3 needs the extra cratemirror[fleet]")
    from cratemirror.fleet.storage.s3 import S3Shared

    prefix = "" if registry == DEFAULT_REGISTRY else f"registries/{registry}/"
    return S3Shared(config.s3, max_index_size, prefix, on_integrity_failure)
