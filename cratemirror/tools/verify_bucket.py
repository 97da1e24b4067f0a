"""`cratemirror verify [--fix]` with storage.backend s3: re-hash every crate object in the bucket.

Each object is streamed through SHA-256 (nothing is kept) and compared with the sha256 recorded with it
when it was stored, a record that must authenticate with storage.s3.integrity_key (the object's own
metadata is not trusted otherwise); a listing page at a time and JOBS objects at once, so memory stays
flat however many crates the bucket holds. --fix deletes corrupt and unauthenticated objects: the next
request for one fetches it from upstream again and stores a good copy.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cratemirror.config.schema import Config
from cratemirror.fleet.storage import SharedStorage, StoredCrate
from cratemirror.names import CrateVersion
from cratemirror.tools.common import EXIT_FAILURE, EXIT_OK, Progress, plural, run_on_bucket, shared_storages

JOBS = 8  # objects re-hashed at once
QUIET_PROGRESS_EVERY = 1000


@dataclass(frozen=True, slots=True)
class BucketProblem:
    kind: str  # corrupt | unauthenticated
    key: CrateVersion
    detail: str

    def describe(self) -> str:
        return f"{self.kind.upper()} {self.key.crate.name} {self.key.version}: {self.detail}"


@dataclass
class BucketReport:
    checked: int = 0
    ok: int = 0
    problems: list[BucketProblem] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for problem in self.problems if problem.kind == kind)


async def verify_bucket(shared: SharedStorage, limit: int, progress: Progress) -> BucketReport:
    report = BucketReport()

    async def check(item: StoredCrate) -> None:
        copy = await shared.read_crate(item.key, None, limit)
        label = f"{item.key.crate.name} {item.key.version}"
        if copy is None:
            progress.step(label)  # deleted since the listing (a prune, another verify --fix)
            return
        report.checked += 1
        problem: BucketProblem | None = None
        if copy.too_large:
            problem = BucketProblem("corrupt", item.key, f"larger than upstream.max_crate_size ({limit} B)")
        elif copy.recorded is None:
            detail = "no sha256 recorded with the object that authenticates with storage.s3.integrity_key"
            problem = BucketProblem("unauthenticated", item.key, detail)
        elif copy.sha256 != copy.recorded:
            problem = BucketProblem(
                "corrupt", item.key, f"bytes hash to {copy.sha256}, expected {copy.recorded} ({copy.size} B)"
            )
        if problem is None:
            report.ok += 1
        else:
            report.problems.append(problem)
            progress.note(problem.describe())
        progress.step(label)

    pending: set[asyncio.Task[None]] = set()
    try:
        async for item in shared.iter_crates():
            progress.total = progress.total + 1
            if len(pending) >= JOBS:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a failed read ends the run
            pending.add(asyncio.create_task(check(item)))
        await asyncio.gather(*pending)
    finally:
        for task in pending:
            task.cancel()
    progress.finish()
    return report


async def fix_bucket(shared: SharedStorage, report: BucketReport) -> list[str]:
    failures: list[str] = []
    for problem in report.problems:
        try:
            await shared.delete_crate(problem.key)
        except Exception as exc:  # reported per object; the rest are still removed
            failures.append(f"could not delete {problem.key.crate.name} {problem.key.version}: {exc}")
    return failures


async def _verify_all(config: Config, fix_problems: bool) -> int:
    codes = []
    async with shared_storages(config) as storages:
        for name, shared in storages:
            verb = f"verify [{name}]" if name else "verify"
            codes.append(await _verify_one(shared, verb, config.upstream.max_crate_size, fix_problems))
    return max(codes)


async def _verify_one(shared: SharedStorage, verb: str, limit: int, fix_problems: bool) -> int:
    report = await verify_bucket(shared, limit, Progress(verb, 0, every=QUIET_PROGRESS_EVERY))
    skipped = getattr(shared, "skipped", 0)
    print(
        f"{verb}: {plural(report.checked, 'crate object')} in the bucket checked: {report.ok} ok, "
        f"{report.count('corrupt')} corrupt, {report.count('unauthenticated')} unauthenticated"
        + (f"; {plural(skipped, 'other object')} under crates/ left alone" if skipped else "")
    )
    if not report.problems:
        return EXIT_OK
    if not fix_problems:
        print(f"{verb}: run `cratemirror verify --fix` to delete them (fetched again on the next request)")
        return EXIT_FAILURE
    failures = await fix_bucket(shared, report)
    for failure in failures:
        print(f"{verb}: {failure}")
    print(
        f"{verb}: fixed {len(report.problems) - len(failures)} of {len(report.problems)}: "
        "deleted from the bucket"
    )
    return EXIT_FAILURE if failures else EXIT_OK


def run_verify_bucket(config: Config, fix_problems: bool) -> int:
    return run_on_bucket(_verify_all(config, fix_problems))
