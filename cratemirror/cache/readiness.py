"""What /readyz says, kept up to date in the background: the route reads it and never waits.

Once a second the watch probes each registry's cache dir (a small write, in a thread); Redis and the
bucket are judged by their own background loops (coordination's health loop, the storage breaker's
probe), whose `problem()` reads state and does no I/O. The verdict:

- ready: everything works as configured;
- degraded (still 200: the replica answers): Redis or the bucket unreachable, or the cache disk
  failing (answers are passed through from upstream uncached);
- not ready (503): the replica cannot answer at all: its cache disk fails and it is offline, so it has
  neither a cache nor an upstream to answer from.

The same in every worker: each worker process has its own Redis client and bucket breaker, and one that
made no call to a stalled bucket would not know. So once a second each worker writes what it sees
(`<pid>-readyz.json` in the cache dir's locks/, with the workers' other shared state) and reads what
the others wrote in the last few seconds; /readyz answers with all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cratemirror.cache.registry import Registry
from cratemirror.fleet.storage.disk import DiskTrouble

WATCH_EVERY = 1.0  # seconds between two looks at the cache dirs
SHARED_FRESH = 3.0  # seconds another worker's note counts
SHARED_FORGET = 60.0  # a note this old is a dead worker's: removed
NOTE_SUFFIX = "-readyz.json"
NOTE_MAX_BYTES = 8192
NOTE_MAX_PROBLEMS = 8
PROBLEM_MAX_CHARS = 400
SAME_PROBLEM_PREFIX = 24  # two workers' texts for one problem differ only after this (e.g. "for 3s")


@dataclass(frozen=True, slots=True)
class Verdict:
    ready: bool  # False: 503, the replica cannot answer at all
    reason: str | None  # None: plain ready; else why it is degraded (or not ready)

    def text(self) -> str:
        if self.reason is None:
            return "ready\n"
        return f"{'degraded' if self.ready else 'not ready'}: {self.reason}\n"


class ReadinessWatch:
    def __init__(self, registries: Mapping[str, Registry], disk_trouble: DiskTrouble, offline: bool) -> None:
        self.registries = registries
        self.disk_trouble = disk_trouble
        self.offline = offline
        self.disk_problem: str | None = None
        self.others: list[str] = []  # what the other workers of this replica see

    async def run(self) -> None:
        """Until cancelled: the cache dirs' state, and the workers' notes, once a second."""
        try:
            while True:
                with contextlib.suppress(Exception):
                    self.disk_problem = await asyncio.to_thread(self._disk)
                with contextlib.suppress(Exception):
                    own = await self._fleet_problems()
                    self.others = await asyncio.to_thread(self._exchange, own)
                await asyncio.sleep(WATCH_EVERY)
        finally:
            with contextlib.suppress(Exception):
                self._note_path().unlink(missing_ok=True)

    def _notes_dir(self) -> Path | None:
        registry = next(iter(self.registries.values()), None)
        return registry.store.locks_dir if registry is not None else None

    def _note_path(self) -> Path:
        directory = self._notes_dir()
        if directory is None:
            raise FileNotFoundError("no cache dir")
        return directory / f"{os.getpid()}{NOTE_SUFFIX}"

    def _exchange(self, own: list[str]) -> list[str]:
        """Write this worker's note, read the others' fresh ones (checked like any other input)."""
        directory = self._notes_dir()
        if directory is None:
            return []
        mine = self._note_path()
        temp = mine.with_suffix(".tmp")
        temp.write_text(json.dumps({"problems": own}))
        os.replace(temp, mine)
        now = time.time()
        seen: list[str] = []
        for note in directory.glob(f"*{NOTE_SUFFIX}"):
            if note == mine:
                continue
            with contextlib.suppress(OSError, ValueError):
                age = now - note.stat().st_mtime
                if age > SHARED_FORGET:
                    note.unlink(missing_ok=True)
                    continue
                if age > SHARED_FRESH:
                    continue
                with open(note, "rb") as handle:
                    document = json.loads(handle.read(NOTE_MAX_BYTES))
                problems = document.get("problems") if isinstance(document, dict) else None
                if isinstance(problems, list):
                    seen += [
                        "".join(ch for ch in problem[:PROBLEM_MAX_CHARS] if ch.isprintable())
                        for problem in problems[:NOTE_MAX_PROBLEMS]
                        if isinstance(problem, str)
                    ]
        return seen

    async def _fleet_problems(self) -> list[str]:
        problems: list[str] = []
        for registry in self.registries.values():
            # Both read state their background loops keep: no I/O here.
            for problem in (await registry.coordination.problem(), await registry.shared.problem()):
                if problem:
                    problems.append(problem)
        return problems

    def _disk(self) -> str | None:
        for registry in self.registries.values():
            problem = registry.store.writable_problem()
            if problem:
                return problem
        return None

    async def verdict(self, also: str | None = None) -> Verdict:
        """`also`: a problem of a layer above this one (e.g. the tokens file), already known."""
        disk = self.disk_problem or self.disk_trouble.recent()
        if disk and self.offline:
            return Verdict(False, f"{disk}; offline, so nothing to answer from")
        reasons = [f"{disk}; answers are passed through uncached"] if disk else []
        if also:
            reasons.append(also)
        known = set()
        for problem in [*await self._fleet_problems(), *self.others]:
            if problem[:SAME_PROBLEM_PREFIX] not in known:
                known.add(problem[:SAME_PROBLEM_PREFIX])
                reasons.append(problem)
        return Verdict(True, "; ".join(reasons) or None)
