"""Cross-process locks in the cache dir: every worker process (and tool) using it shares them.

`KeyLocks`: one exclusive lock per key (a fill of an index file or a crate), keys hashed onto 4096
stripes; two keys that share a stripe only wait for each other, and no code path holds two locks at
once. On Linux a stripe is one byte of a single lock file, taken with an open-file-description lock
(F_OFD_SETLK: owned by the descriptor like flock, so two fills in one process exclude each other too,
and released by closing it). Creating a file costs up to a millisecond of journal work on ext4, and a
cold cache created one stripe file per new key; opening the one existing file costs microseconds.
Elsewhere, one flock'd file per stripe. `flocked` / `try_flock`: one lock file, for the eviction."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import struct
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("cratemirror.store")

LOCK_STRIPES = 4096
EVICT_LOCK = "evict.lock"
KEYS_LOCK = "keys.lock"  # with OFD locks: one byte per stripe
_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
_OFD_SETLKW: int | None = getattr(fcntl, "F_OFD_SETLKW", None)
# Waiting on another process's lock blocks a thread; these threads do nothing else.
_LOCK_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="cratemirror-lock")


class KeyLocks:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ranges = _OFD_SETLK is not None and _OFD_SETLKW is not None

    @staticmethod
    def stripe(key: str) -> int:
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % LOCK_STRIPES

    def _stripe_path(self, key: str) -> Path:
        return self.directory / f"{self.stripe(key):04x}.lock"

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        fd = self._open()
        if fd is None:
            async with flocked(self._stripe_path(key), key):
                yield
            return
        stripe = self.stripe(key)
        try:
            if not _range_lock(fd, stripe, wait=False):
                await asyncio.get_running_loop().run_in_executor(_LOCK_THREADS, _range_lock, fd, stripe, True)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def try_lock(self, key: str) -> Iterator[bool]:
        fd = self._open()
        if fd is None:
            with try_flock(self._stripe_path(key)) as held:
                yield held
            return
        try:
            yield _range_lock(fd, self.stripe(key), wait=False)
        finally:
            os.close(fd)

    def _open(self) -> int | None:
        """The shared lock file, writable (a write lock needs it); None: use the stripe files."""
        if not self.ranges:
            return None
        try:
            return os.open(self.directory / KEYS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None  # a read-only cache dir or lock file: the stripe files need no write access


def _range_lock(fd: int, offset: int, wait: bool) -> bool:
    """An exclusive OFD lock on one byte at `offset`; False if another descriptor holds it (no wait)."""
    command = _OFD_SETLKW if wait else _OFD_SETLK
    assert command is not None
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
    request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, command, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES) and not wait:
            return False
        raise
    return True


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
