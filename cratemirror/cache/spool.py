"""Where a fill's bytes go while they arrive: a temp file in the cache dir, or memory when the disk
refuses them (read-only, ENOSPC), so a sick disk costs the cache but never the client's answer."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("cratemirror.crates")


# With the disk refusing writes, a fill is held in memory: at most this much per fill.
MEMORY_LIMIT = 64 * 1024 * 1024


class MemorySpoolFull(Exception):
    """The disk refused the bytes and they would not fit in the memory allowance."""


class Spool:
    def __init__(self, temp: Path, memory_limit: int = MEMORY_LIMIT) -> None:
        self.temp = temp
        self.memory_limit = memory_limit
        self.size = 0
        self.disk_error: OSError | None = None
        self._out: BinaryIO | None = None
        self._reader: BinaryIO | None = None
        self._memory: bytearray | None = None
        try:
            self._out = open(temp, "wb")  # noqa: SIM115 - closed in close()
            self._reader = open(temp, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        except OSError as exc:
            self._to_memory(exc)

    @property
    def on_disk(self) -> bool:
        return self._memory is None

    def write(self, chunk: bytes) -> None:
        if self._out is not None:
            try:
                self._out.write(chunk)
                self._out.flush()  # readers use pread on the file: the bytes must be in the kernel
                self.size += len(chunk)
                return
            except OSError as exc:
                self._to_memory(exc)
        assert self._memory is not None
        if self.size + len(chunk) > self.memory_limit:
            raise MemorySpoolFull(f"more than {self.memory_limit} bytes")
        self._memory += chunk
        self.size += len(chunk)

    def read_at(self, position: int, size: int) -> bytes:
        if self._memory is not None:
            return bytes(self._memory[position : position + size])
        assert self._reader is not None
        return os.pread(self._reader.fileno(), size, position)

    def reset(self) -> None:
        """Start over (a retried download)."""
        self.size = 0
        if self._memory is not None:
            self._memory.clear()
        elif self._out is not None:
            self._out.seek(0)
            self._out.truncate()

    def close(self) -> None:
        """Close the writer; the reader stays usable (clients may still be sending) until release()."""
        if self._out is not None:
            self._out.close()
            self._out = None

    def release(self) -> None:
        self.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self.on_disk:
            # Still there only if it was not committed. On a read-only disk even a missing file's
            # unlink fails (EROFS, not ENOENT): nothing to clean up then.
            with contextlib.suppress(OSError):
                self.temp.unlink()

    def _to_memory(self, exc: OSError) -> None:
        self.disk_error = exc
        kept = bytearray()
        if self._reader is not None and self.size:
            with contextlib.suppress(OSError):
                kept = bytearray(os.pread(self._reader.fileno(), self.size, 0))
        self._memory = kept
        self.size = len(kept)
        for handle in (self._out, self._reader):
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
        self._out = self._reader = None
        with contextlib.suppress(OSError):
            self.temp.unlink()
