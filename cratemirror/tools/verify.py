"""`cratemirror verify [--fix]`: re-hash every stored crate against the sha256 recorded when it was stored.

Written once against the storage seam (ArtifactStore): the cache dir's crate files, or with
storage.backend s3 the bucket's crate objects. Each crate is streamed through SHA-256 (nothing is kept),
a listing page at a time and JOBS at once, so memory stays flat however many crates are stored.

Found: CORRUPT (bytes that do not hash to the record, or a bucket object larger than
upstream.max_crate_size), a crate without a recorded checksum (ORPHANED in a cache dir; in the bucket
UNAUTHENTICATED: only a record that authenticates with storage.s3.integrity_key counts), MISSING (a
record without its file), and in a cache dir files this mirror would not have written (ORPHANED; in a
bucket such objects are counted and left alone: its prefix may hold others').

Safe while the server runs: without --fix nothing is written. With --fix, what is bad is removed
(lock-safe beside the server's fills); the next request for one fetches it from upstream again.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from cratemirror.config.schema import Config
from cratemirror.fleet.storage import ArtifactStore, StoredCrate, Stray
from cratemirror.names import CrateVersion
from cratemirror.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Backend,
    Opened,
    Progress,
    backend_of,
    open_stores,
    plural,
    run_tool,
    tool_config,
)

JOBS = 8  # crates re-hashed at once
QUIET_PROGRESS_EVERY = 1000


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # corrupt | unrecorded | missing | stray
    label: str  # "name version", or where a stray lies
    detail: str
    key: CrateVersion | None = None  # removed with delete_crates
    stray: Stray | None = None  # removed with delete_stray

    def describe(self, backend: Backend) -> str:
        kind = {"stray": "orphaned", "unrecorded": backend.unrecorded}.get(self.kind, self.kind)
        return f"{kind.upper()} {self.label}: {self.detail}"


@dataclass
class VerifyReport:
    checked: int = 0
    ok: int = 0
    others: int = 0  # strays left alone (a bucket's)
    problems: list[Problem] = field(default_factory=list)

    def count(self, *kinds: str) -> int:
        return sum(1 for problem in self.problems if problem.kind in kinds)


class Verifier:
    def __init__(self, store: ArtifactStore, backend: Backend, limit: int, progress: Progress) -> None:
        self.store, self.backend, self.limit, self.progress = store, backend, limit, progress
        self.report = VerifyReport()

    async def run(self) -> VerifyReport:
        """Every listed crate, then what lies beside them (strays)."""
        await _bounded(self.store.list_crates(), self.check_crate, self.progress)
        async for stray in self.store.list_strays():
            await self.check_stray(stray)
        self.progress.finish()
        return self.report

    async def check_crate(self, item: StoredCrate) -> None:
        key = item.key
        label = f"{key.crate.name} {key.version}"
        copy = await self.store.read_crate(key, None, self.limit)
        if copy is None:
            record = await self.store.stat_crate(key)
            if record is not None and record.sha256 is not None and not record.present:
                self.found(Problem("missing", label, "checksum recorded but no file", key))
            self.progress.step(label)  # else deleted since the listing (a prune, another verify --fix)
            return
        self.report.checked += 1
        problem: Problem | None = None
        if copy.too_large:
            problem = Problem("corrupt", label, f"larger than upstream.max_crate_size ({self.limit} B)", key)
        elif copy.recorded is None:
            problem = Problem("unrecorded", label, self.unrecorded, key)
        elif copy.sha256 != copy.recorded:
            sizes = f"{copy.size} of {item.size} bytes"
            detail = f"bytes hash to {copy.sha256}, expected {copy.recorded} ({sizes})"
            problem = Problem("corrupt", label, detail, key)
        if problem is None:
            self.report.ok += 1
        else:
            self.found(problem)
        self.progress.step(label)

    async def check_stray(self, stray: Stray) -> None:
        if stray.key is None:
            if not self.backend.owns_strays:
                self.report.others += 1
                return
            self.report.checked += 1
            detail = f"not a {self.backend.thing} this mirror wrote"
            self.found(Problem("stray", stray.name, detail, stray=stray))
            return
        copy = await self.store.read_crate(stray.key, None, self.limit)
        if copy is None or copy.recorded is not None:
            return  # gone, or recorded by a fill meanwhile
        self.report.checked += 1
        label = f"{stray.key.crate.name} {stray.key.version}"
        self.found(Problem("unrecorded", label, self.unrecorded, stray=stray))

    @property
    def unrecorded(self) -> str:
        return self.backend.unrecorded_detail

    def found(self, problem: Problem) -> None:
        self.report.problems.append(problem)
        self.progress.note(problem.describe(self.backend))


async def _bounded(
    listing: AsyncIterator[StoredCrate],
    check: Callable[[StoredCrate], Coroutine[Any, Any, None]],
    progress: Progress,
) -> None:
    """`check` every listed crate, JOBS at once; the first failure ends the run."""
    pending: set[asyncio.Task[None]] = set()
    try:
        async for item in listing:
            progress.total = max(progress.total, progress.done + len(pending) + 1)
            if len(pending) >= JOBS:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            pending.add(asyncio.create_task(check(item)))
        await asyncio.gather(*pending)
    finally:
        for task in pending:
            task.cancel()


async def fix(store: ArtifactStore, report: VerifyReport) -> list[str]:
    """Remove what is bad; the server fetches those crates again on the next request. Returns failures."""
    failures: list[str] = []
    for problem in report.problems:
        try:
            if problem.stray is not None:
                await store.delete_stray(problem.stray)  # kept if a fill has recorded it since
            elif problem.key is not None and not await store.delete_crates([problem.key]):
                failures.append(f"could not remove {problem.label}: a fill holds it now; run verify again")
        except Exception as exc:  # reported per crate; the rest are still removed
            failures.append(f"could not remove {problem.label}: {' '.join(str(exc).split())[:300]}")
    return failures


def run_verify(args: argparse.Namespace) -> int:
    config = tool_config(args)
    code = run_tool(config, _verify_all(config, args.fix))
    from cratemirror.tools.toolchain_upkeep import verify_toolchains

    return max(code, verify_toolchains(config, args.fix))  # a no-op for a cache that has no toolchains


async def _verify_all(config: Config, fix_problems: bool) -> int:
    backend = backend_of(config)
    limit = backend.read_limit(config)
    async with open_stores(config) as opened:
        return max([await _verify_one(one, backend, limit, fix_problems) for one in opened])


async def _verify_one(opened: Opened, backend: Backend, limit: int, fix_problems: bool) -> int:
    """Verify one registry's store (crates.io's, or an extra registry's)."""
    verb = f"verify{opened.verb_suffix}"
    progress = Progress(verb, 0, every=QUIET_PROGRESS_EVERY)
    report = await Verifier(opened.store, backend, limit, progress).run()
    print(f"{verb}: {_summary(report, backend)}")
    if not report.problems:
        return EXIT_OK
    if not fix_problems:
        print(
            f"{verb}: run `cratemirror verify --fix` to remove them "
            "(they are fetched again on the next request)"
        )
        return EXIT_FAILURE
    failures = await fix(opened.store, report)
    for failure in failures:
        print(f"{verb}: {failure}")
    things = f"{backend.thing}s"
    print(
        f"{verb}: fixed {len(report.problems) - len(failures)} of {len(report.problems)}: removed "
        f"{report.count('corrupt')} corrupt and {report.count('unrecorded', 'stray')} "
        f"{backend.unrecorded} {things}, "
        f"{report.count('missing')} stale checksum records"
    )
    return EXIT_FAILURE if failures else EXIT_OK


def _summary(report: VerifyReport, backend: Backend) -> str:
    where = " in the bucket" if backend.bucket else ""
    checked = plural(report.checked, f"crate {backend.thing}")
    text = f"{checked}{where} checked: {report.ok} ok, {report.count('corrupt')} corrupt, "
    if backend.owns_strays:
        return text + (
            f"{report.count('unrecorded', 'stray')} orphaned; "
            f"{report.count('missing')} missing (checksum recorded, no file)"
        )
    others = f"; {plural(report.others, 'other object')} under crates/ left alone" if report.others else ""
    return text + f"{report.count('unrecorded')} {backend.unrecorded}" + others
