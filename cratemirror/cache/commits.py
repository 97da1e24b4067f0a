"""Group commit of verified crates: the fills that finish while a commit runs are made durable and
renamed into place together, in the next one (Store.commit_crates: two ledger transactions and two
filesystem syncs per batch instead of two fsyncs and two transactions per crate). No timer: a lone
fill commits at once, and a burst of a cold build's crates costs a few batches, not a hundred."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from pathlib import Path

from cratemirror.fleet.storage.disk import CrateMeta, Store

log = logging.getLogger("cratemirror.crates")

MAX_BATCH = 256


class CommitQueue:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._waiting: list[tuple[Path, CrateMeta, asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def commit(self, temp: Path, meta: CrateMeta) -> None:
        """Returns once `temp` (verified, closed) is durable at its place and counted in the ledger;
        raises OSError or sqlite3.Error if it could not be stored."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((temp, meta, done))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._drain())
        # Shielded: a fill cancelled at shutdown must not leave its batch half reported.
        await asyncio.shield(done)

    async def close(self) -> None:
        if self._runner is not None:
            await asyncio.wait({self._runner})

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            try:
                await asyncio.to_thread(self.store.commit_crates, [(temp, meta) for temp, meta, _ in batch])
            except (OSError, sqlite3.Error) as exc:
                # One bad file (or a disk hiccup) must not cost the others: commit them one by one.
                log.warning("committing %d crates together failed (%s): one by one", len(batch), exc)
                for temp, meta, done in batch:
                    try:
                        await asyncio.to_thread(_commit_one, self.store, temp, meta)
                    except (OSError, sqlite3.Error) as one:
                        _settle(done, one)
                    else:
                        _settle(done, None)
            else:
                for _, _, done in batch:
                    _settle(done, None)


def _commit_one(store: Store, temp: Path, meta: CrateMeta) -> None:
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    store.commit_crate(temp, meta)


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
        done.exception()  # retrieved: the fill may be gone (shutdown)
