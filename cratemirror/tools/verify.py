"""`cratemirror verify [--fix]`: re-hash every cached crate against the sha256 recorded when it was stored.

Safe while the server runs: without --fix nothing is written. With --fix, bad files and stale metadata are
removed (a server that has the file open keeps its descriptor; the next request fetches it again).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cratemirror.fleet.storage.disk import Store, sha256_stream
from cratemirror.fleet.storage.ledger import STORED
from cratemirror.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Progress,
    extra_stores,
    open_existing_store,
    plural,
    tool_config,
    uses_bucket,
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
    """The ledger a page at a time (each recorded crate re-hashed, or found missing), then one walk for
    files nobody recorded: memory stays flat however many crates the cache holds."""
    report = VerifyReport()
    progress.total = store.ledger.totals()[1]
    for row in store.iter_ledger():
        if row.state != STORED:
            continue  # a commit or an eviction in flight right now
        path = store.crate_path(row.name, row.version)
        if _is_missing(store, row.name, row.version):
            gone = Problem("missing", path, "checksum recorded but no file", row.name, row.version)
            _found(report, progress, gone, store.root)
            continue
        report.checked += 1
        bad = _check_file(store, row.name, row.version, path)
        if bad is None:
            report.ok += 1
        else:
            _found(report, progress, bad, store.root)
        progress.step(f"{row.name} {row.version}")
    for path, parsed in _crate_files(store):
        if parsed is None:
            problem: Problem | None = Problem("orphaned", path, "not a file this mirror wrote")
        elif store.get_crate_meta(*parsed) is None:
            problem = _check_file(store, parsed[0], parsed[1], path)
        else:
            continue  # recorded: checked above (or committed since)
        if problem is not None:
            report.checked += 1
            _found(report, progress, problem, store.root)
    progress.finish()
    return report


def _found(report: VerifyReport, progress: Progress, problem: Problem, root: Path) -> None:
    report.problems.append(problem)
    progress.note(problem.describe(root))


def _crate_files(store: Store) -> Iterator[tuple[Path, tuple[str, str] | None]]:
    """Every crate file, with (name, version) if it is named the way this mirror names its files."""
    for path in store.iter_crate_files():
        name, stem = path.parent.name, path.name[: -len(".crate")]
        yield path, (name, stem[len(name) + 1 :]) if stem.startswith(f"{name}-") else None


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


def _is_missing(store: Store, name: str, version: str) -> bool:
    if store.crate_path(name, version).exists():
        return False
    # A fill or an eviction may be at work on it this moment: look again.
    again = store.ledger.get(name, version)
    return again is not None and again.state == STORED and not store.crate_path(name, version).exists()


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
    if uses_bucket(config):
        from cratemirror.tools.verify_bucket import run_verify_bucket

        return run_verify_bucket(config, args.fix)
    stores = [("", open_existing_store(config)), *extra_stores(config)]
    try:
        codes = [
            _verify_one(store, f"verify [{name}]" if name else "verify", args.fix) for name, store in stores
        ]
    finally:
        for _, store in stores:
            store.close()
    from cratemirror.tools.toolchain_upkeep import verify_toolchains

    codes.append(verify_toolchains(config, args.fix))  # a no-op for a cache that has no toolchains
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
