"""The storage seam's values and interfaces (re-exported by cratemirror.fleet.storage): what the server
asks of the shared store (`SharedStorage`) and what the operator tools ask of one registry's stored
artifacts (`ArtifactStore`), with the values they pass. Backends import these from here, so no backend
module imports the package that picks it (no import cycle)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from cratemirror.names import CrateName, CrateVersion

if TYPE_CHECKING:
    from cratemirror.fleet.storage.disk import IndexEntry

# Called with the object's kind ("index" | "crate") each time a read object fails authentication or its
# hash (cratemirror_storage_integrity_failures_total).
IntegrityFailure = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class StoredCrate:
    """A crate object as listed by the store (for the operator tools: verify, prune, export)."""

    key: CrateVersion
    size: int
    stored_at: float  # when it was written (S3: LastModified)
    used_at: float | None = None  # when last served, where the store keeps it (a cache dir's ledger)

    @property
    def recency(self) -> float:
        """What least-recently-used means on this store: last use, else (a bucket) when stored."""
        return self.used_at if self.used_at is not None else self.stored_at


@dataclass(frozen=True, slots=True)
class CrateRecord:
    """What `stat_crate` knows of one crate without reading it."""

    key: CrateVersion
    sha256: str | None  # the checksum recorded when it was stored (None: nobody recorded one)
    present: bool  # its bytes are there (a cache dir's ledger may outlive its file)
    stored_at: float


@dataclass(frozen=True, slots=True)
class Stray:
    """Something under crates/ that no listed crate accounts for: a file or object this mirror would
    not have written (`key` None), or, in a cache dir, a crate file without a recorded checksum."""

    name: str  # where it is, relative to the store's crates/ (for messages; never opened as a path)
    key: CrateVersion | None


@dataclass(frozen=True, slots=True)
class VerifiedCrate:
    """A crate in a temp file from `new_temp_file()`, already hashed by the caller to `sha256`."""

    key: CrateVersion
    path: Path
    sha256: str
    size: int
    fetched_at: float


@dataclass(frozen=True, slots=True)
class CrateCopy:
    """What `read_crate` saw: the sha256 recorded with the object (None unless the record is
    authenticated with the fleet secret) and what its bytes hash to."""

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

    async def put_toolchain(self, path: str, verified: Path, sha256: str) -> None:
        """Store a toolchain file (a component, rustup-init) whose bytes hash to `sha256`; `path` is a
        ToolchainPath's validated path (cache/toolchains/paths.py), never request text."""
        ...

    async def fetch_toolchain(self, path: str, sha256: str, into: Path, limit: int) -> int | None:
        """Copy the stored toolchain file into `into` if it is there, authenticated, and hashes to
        `sha256` (the verified manifest's): its size, else None."""
        ...

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

    async def put_first_seen(self, crate: CrateName, body: bytes) -> None:
        """The fleet's first-seen times of a crate's index lines (policy/cooldown.py encodes them),
        replacing the earlier object."""
        ...

    async def get_first_seen(self, crate: CrateName, limit: int) -> bytes | None:
        """That object's bytes; None if it is missing, larger than `limit` or fails authentication (the
        last two counted as integrity failures). Raises when the store cannot answer: absent and
        unknown differ to the caller."""
        ...


class ArtifactStore(Protocol):
    """One registry's stored crates and index files, as verify, prune, export and import see them.

    Crates: listed (by name, or least recently used first), stat'ed, read through SHA-256, deleted,
    and put only as verified temp files. Index files: read and put. Nothing here trusts the stored
    bytes: `read_crate` reports what they hash to, the caller compares."""

    def list_crates(self, oldest_first: bool = False) -> AsyncIterator[StoredCrate]:
        """Every crate this mirror stored, grouped by name (or by `recency`, oldest first)."""
        ...

    def list_strays(self) -> AsyncIterator[Stray]:
        """What else lies under crates/ (see Stray)."""
        ...

    async def stat_crate(self, key: CrateVersion) -> CrateRecord | None:
        """None when the store has neither bytes nor a record of the crate."""
        ...

    async def read_crate(self, key: CrateVersion, out: IO[bytes] | None, limit: int) -> CrateCopy | None:
        """Stream the stored crate through SHA-256 (into `out` if given): None if its bytes are not there."""
        ...

    async def delete_crates(self, keys: Sequence[CrateVersion]) -> list[CrateVersion]:
        """Delete these crates (bytes and record); returns those deleted (a cache dir leaves one that a
        fill holds at this moment)."""
        ...

    async def delete_stray(self, stray: Stray) -> bool:
        """Remove a stray, unless it has become a recorded crate meanwhile: whether it was removed."""
        ...

    def new_temp_file(self) -> Path:
        """A fresh path for a crate to be put (on the cache dir's own filesystem, so a put renames it)."""
        ...

    async def put_crates(self, batch: Sequence[VerifiedCrate]) -> None:
        """Store verified crates; their temp files are gone afterwards (moved into place or deleted)."""
        ...

    async def usage(self) -> tuple[int, int]:
        """(bytes, crates) stored."""
        ...

    def pruning(self) -> AbstractAsyncContextManager[None]:
        """Held while a prune chooses and deletes (a cache dir: the server's own eviction lock)."""
        ...

    async def get_index(self, crate: CrateName) -> IndexEntry | None: ...

    async def put_index(self, crate: CrateName, entry: IndexEntry) -> None: ...
