"""`cratemirror verify [--fix]`: re-hash every cached crate against the sha256 recorded when it was stored.

Safe while the server runs: without --fix nothing is written. With --fix, bad files and stale metadata are
removed (a server that has the file open keeps its descriptor; the next request fetches it again).
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from cratemirror.eviction import scan_crates
from cratemirror.store import CrateMeta, Store, sha256_stream
from cratemirror.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Progress,
    cached_crate_metas,
    extra_stores,
    open_existing_store,
    plural,
    tool_config,
)

QUIET_PROGRESS_EVERY = 1000


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # corrupt | orphaned | missing
    path: Path
    detail: str
    name: str | None = None  # None for a file whose name this mirror would never have written
    version: str | None = None

    def describe(self, root: Path) -> str:
        what = f"{self.name} {self.version}" if self.name else str(self.path.relative_to(root))
        return f"{self.kind.upper()} {what}: {self.detail}"


@dataclass
class VerifyReport:
    checked: int = 0
    ok: int = 0
    problems: list[Problem] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for problem in self.problems if problem.kind == kind)


def verify_store(store: Store, progress: Progress) -> VerifyReport:
    report = VerifyReport()
    files = scan_crates(store)
    known_paths = {item.path for item in files}
    progress.total = len(files)
    for item in files:
        report.checked += 1
        problem = _check_file(store, item.name, item.version, item.path)
        if problem is None:
            report.ok += 1
        else:
            report.problems.append(problem)
            progress.note(problem.describe(store.root))
        progress.step(f"{item.name} {item.version}")
    for path in store.iter_crate_files():  # files named in no way this mirror writes
        if path not in known_paths and path.exists():
            report.checked += 1
            problem = Problem("orphaned", path, "not a file this mirror wrote")
            report.problems.append(problem)
            progress.note(problem.describe(store.root))
    for meta in cached_crate_metas(store):
        if _is_missing(store, meta):
            problem = Problem(
                "missing", store.crate_path(meta.name, meta.version), "checksum recorded but no file",
                meta.name, meta.version,
            )  # fmt: skip
            report.problems.append(problem)
            progress.note(problem.describe(store.root))
    progress.finish()
    return report


def _check_file(store: Store, name: str, version: str, path: Path) -> Problem | None:
    meta = store.get_crate_meta(name, version)
    if meta is None:
        if not path.exists():
            return None  # evicted while we looked: eviction removes the file before its metadata
        return Problem("orphaned", path, "no checksum recorded for this file", name, version)
    try:
        with open(path, "rb") as handle:
            digest, size = sha256_stream(handle)
    except FileNotFoundError:
        return None  # evicted meanwhile
    if digest != meta.sha256:
        return Problem(
            "corrupt", path, f"bytes hash to {digest}, expected {meta.sha256} ({size} of {meta.size} bytes)",
            name, version,
        )  # fmt: skip
    return None


def _is_missing(store: Store, meta: CrateMeta) -> bool:
    if store.crate_path(meta.name, meta.version).exists():
        return False
    # A fill records the checksum just before renaming its file into place: look again.
    again = store.get_crate_meta(meta.name, meta.version)
    return again is not None and not store.crate_path(meta.name, meta.version).exists()


def fix(store: Store, report: VerifyReport) -> list[str]:
    """Remove what is bad; the server fetches those crates again on the next request. Returns failures."""
    failures: list[str] = []
    for problem in report.problems:
        try:
            if problem.name is not None and problem.version is not None and problem.kind != "orphaned":
                store.remove_crate(problem.name, problem.version)  # the file and its metadata
            elif not _recorded_since(store, problem):
                with contextlib.suppress(FileNotFoundError):
                    problem.path.unlink()
        except OSError as exc:
            failures.append(f"could not remove {problem.path}: {exc.strerror or exc}")
    return failures


def _recorded_since(store: Store, problem: Problem) -> bool:
    """An orphan that a fill has just recorded a checksum for is a good file now: keep it."""
    if problem.name is None or problem.version is None:
        return False
    return store.get_crate_meta(problem.name, problem.version) is not None


def run_verify(args: argparse.Namespace) -> int:
    config = tool_config(args)
    stores = [("", open_existing_store(config)), *extra_stores(config)]
    try:
        codes = [
            _verify_one(store, f"verify [{name}]" if name else "verify", args.fix) for name, store in stores
        ]
    finally:
        for _, store in stores:
            store.close()
    return max(codes)


def _verify_one(store: Store, verb: str, fix_problems: bool) -> int:
    """Verify one registry's cache (crates.io's at the top of cache.dir, or an extra registry's)."""
    progress = Progress(verb, 0, every=QUIET_PROGRESS_EVERY)
    report = verify_store(store, progress)
    print(
        f"{verb}: {plural(report.checked, 'crate file')} checked: {report.ok} ok, "
        f"{report.count('corrupt')} corrupt, {report.count('orphaned')} orphaned; "
        f"{report.count('missing')} missing (checksum recorded, no file)"
    )
    if not report.problems:
        return EXIT_OK
    if not fix_problems:
        print(
            f"{verb}: run `cratemirror verify --fix` to remove them "
            "(they are fetched again on the next request)"
        )
        return EXIT_FAILURE
    failures = fix(store, report)
    for failure in failures:
        print(f"{verb}: {failure}")
    print(
        f"{verb}: fixed {len(report.problems) - len(failures)} of {len(report.problems)}: removed "
        f"{report.count('corrupt')} corrupt and {report.count('orphaned')} orphaned files, "
        f"{report.count('missing')} stale checksum records"
    )
    return EXIT_FAILURE if failures else EXIT_OK
