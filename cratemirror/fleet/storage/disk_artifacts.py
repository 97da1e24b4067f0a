"""DiskArtifacts: the ArtifactStore of one registry's cache dir (a Store), for the operator tools.

The ledger is the record (checksum, size, last use); the files under crates/ are the bytes. Listing
reads the ledger a page at a time; strays are found in one walk of the crate folders. Deleting goes
through the same lock-safe path as the server's eviction, so a tool never removes a crate a fill is
committing. The Store is synchronous: each call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path, PurePosixPath
from typing import IO, TypeVar

from cratemirror.fleet.storage.disk import CrateMeta, IndexEntry, Store, remove_empty_dir
from cratemirror.fleet.storage.ledger import STORED, LedgerRow
from cratemirror.fleet.storage.seam import CrateCopy, CrateRecord, StoredCrate, Stray, VerifiedCrate
from cratemirror.names import CrateName, CrateVersion, InvalidRequest, parse_crate_version

T = TypeVar("T")

PAGE = 1000  # rows or files handed over from the worker thread at a time
CHUNK = 1024 * 1024
DELETE_BATCH = 200  # crates per eviction transaction, as the server's eviction


class DiskArtifacts:
    def __init__(self, store: Store) -> None:
        self.store = store

    # ---- crates -----------------------------------------------------------------------------------

    async def list_crates(self, oldest_first: bool = False) -> AsyncIterator[StoredCrate]:
        rows = self._oldest_rows() if oldest_first else self.store.iter_ledger()
        async for row in _paged(rows):
            if row.state != STORED:
                continue  # a commit or an eviction in flight right now
            try:
                key = parse_crate_version(row.name, row.version)
            except InvalidRequest:
                continue  # a row no fill could have written
            yield StoredCrate(key, row.size, row.fetched_at, row.last_used)

    def _oldest_rows(self) -> Iterator[LedgerRow]:
        for offset in itertools.count(0, PAGE):
            rows = self.store.ledger.oldest(PAGE, offset)
            yield from rows
            if len(rows) < PAGE:
                return

    async def list_strays(self) -> AsyncIterator[Stray]:
        async for stray in _paged(self._strays()):
            yield stray

    def _strays(self) -> Iterator[Stray]:
        for path in self.store.iter_crate_files():
            relative = str(path.relative_to(self.store.root))
            key = self._key_of(path)
            if key is None:
                yield Stray(relative, None)
            elif self.store.ledger.get(key.crate.name, key.version) is None and path.exists():
                yield Stray(relative, key)

    def _key_of(self, path: Path) -> CrateVersion | None:
        """The crate a file holds, if it is named (and placed) the way this mirror names its files."""
        name, stem = path.parent.name, path.name[: -len(".crate")]
        if not stem.startswith(f"{name}-"):
            return None
        try:
            key = parse_crate_version(name, stem[len(name) + 1 :])
        except InvalidRequest:
            return None
        return key if self.store.crate_path(key.crate.name, key.version) == path else None

    async def stat_crate(self, key: CrateVersion) -> CrateRecord | None:
        return await asyncio.to_thread(self._stat, key)

    def _stat(self, key: CrateVersion) -> CrateRecord | None:
        path = self.store.crate_path(key.crate.name, key.version)
        try:
            modified: float | None = path.stat().st_mtime
        except FileNotFoundError:
            modified = None
        row = self.store.ledger.get(key.crate.name, key.version)
        if modified is not None:
            if row is None:
                return CrateRecord(key, None, True, modified)
            return CrateRecord(key, row.sha256, True, row.fetched_at)
        if row is None or row.state != STORED:
            return None
        # A fill or an eviction may be at work on it this moment: the file again, after its record.
        return CrateRecord(key, row.sha256, path.exists(), row.fetched_at)

    async def read_crate(self, key: CrateVersion, out: IO[bytes] | None, limit: int) -> CrateCopy | None:
        return await asyncio.to_thread(self._read, key, out, limit)

    def _read(self, key: CrateVersion, out: IO[bytes] | None, limit: int) -> CrateCopy | None:
        hasher = hashlib.sha256()
        size = 0
        try:
            # Opened once: an eviction meanwhile cannot change what this descriptor reads.
            with open(self.store.crate_path(key.crate.name, key.version), "rb") as handle:
                row = self.store.ledger.get(key.crate.name, key.version)
                while chunk := handle.read(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        break
                    hasher.update(chunk)
                    if out is not None:
                        out.write(chunk)
        except FileNotFoundError:
            return None
        return CrateCopy(row.sha256 if row is not None else None, hasher.hexdigest(), size, size > limit)

    async def delete_crates(self, keys: Sequence[CrateVersion]) -> list[CrateVersion]:
        return await asyncio.to_thread(self._delete, keys)

    def _delete(self, keys: Sequence[CrateVersion]) -> list[CrateVersion]:
        removed: list[CrateVersion] = []
        for start in range(0, len(keys), DELETE_BATCH):
            wanted = {(key.crate.name, key.version): key for key in keys[start : start + DELETE_BATCH]}
            rows = [row for name, version in wanted if (row := self.store.ledger.get(name, version))]
            gone, _ = self.store.evict_rows(rows)
            removed += [wanted[(row.name, row.version)] for row in gone]
        return removed

    async def delete_stray(self, stray: Stray) -> bool:
        return await asyncio.to_thread(self._delete_stray, stray)

    def _delete_stray(self, stray: Stray) -> bool:
        path: Path | None
        if stray.key is not None:
            if self.store.ledger.get(stray.key.crate.name, stray.key.version) is not None:
                return False  # a fill has recorded it meanwhile: a good file now
            path = self.store.crate_path(stray.key.crate.name, stray.key.version)
        else:
            path = self._stray_path(stray.name)
        if path is None:
            return False
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        remove_empty_dir(path.parent)
        return True

    def _stray_path(self, relative: str) -> Path | None:
        """The file a stray from `list_strays` names: crates/<folder>/<file>.crate, nothing else."""
        parts = PurePosixPath(relative).parts
        if len(parts) != 3 or parts[0] != "crates" or not parts[2].endswith(".crate"):
            return None
        if any(part in ("", ".", "..") or "\\" in part for part in parts):
            return None
        return self.store.crates_dir / parts[1] / parts[2]

    def new_temp_file(self) -> Path:
        return self.store.new_temp_file()

    async def put_crates(self, batch: Sequence[VerifiedCrate]) -> None:
        metas = [(item.path, _meta(item)) for item in batch]
        await asyncio.to_thread(self.store.commit_crates, metas)

    async def usage(self) -> tuple[int, int]:
        return await asyncio.to_thread(self.store.ledger.totals)

    def pruning(self) -> AbstractAsyncContextManager[None]:
        return self.store.eviction_lock()

    # ---- index files ------------------------------------------------------------------------------

    async def get_index(self, crate: CrateName) -> IndexEntry | None:
        return await asyncio.to_thread(self.store.get_index, crate.lower)

    async def put_index(self, crate: CrateName, entry: IndexEntry) -> None:
        await asyncio.to_thread(self.store.put_index, crate.lower, entry)


async def _paged(items: Iterator[T]) -> AsyncIterator[T]:
    """A blocking iterator, drained in a worker thread a page at a time."""
    while page := await asyncio.to_thread(lambda: list(itertools.islice(items, PAGE))):
        for item in page:
            yield item


def _meta(item: VerifiedCrate) -> CrateMeta:
    return CrateMeta(item.key.crate.name, item.key.version, item.sha256, item.size, item.fetched_at)
