"""Cross-process locks in the cache dir: every worker process (and tool) using it shares them.

`KeyLocks`: one exclusive lock per key (a fill of an index file or a crate), keys hashed onto a fixed set
of lock files so the directory never grows; two keys that share a stripe only wait for each other, and
no code path holds two locks at once. `flocked` / `try_flock`: one lock file, for the eviction."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("cratemirror.store")

LOCK_STRIPES = 4096
EVICT_LOCK = "evict.lock"
# Waiting on another process's lock blocks a thread; these threads do nothing else.
_LOCK_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="cratemirror-lock")


class KeyLocks:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @staticmethod
    def stripe(key: str) -> int:
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % LOCK_STRIPES

    def _stripe_path(self, key: str) -> Path:
        return self.directory / f"{self.stripe(key):04x}.lock"

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        async with flocked(self._stripe_path(key), key):
            yield

    @contextlib.contextmanager
    def try_lock(self, key: str) -> Iterator[bool]:
        with try_flock(self._stripe_path(key)) as held:
            yield held


@contextlib.asynccontextmanager
async def flocked(path: Path, what: str) -> AsyncIterator[None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access
    except OSError as exc:
        # A read-only or full cache dir: coalesce within this process only, keep answering.
        log.warning("no cross-process lock for %s: %s", what, exc)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            await asyncio.get_running_loop().run_in_executor(_LOCK_THREADS, fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def try_flock(path: Path) -> Iterator[bool]:
    """Yields whether the lock was free (and is now held until the block ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        yield True  # no cross-process locks on this dir (read-only): nothing to wait for
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
