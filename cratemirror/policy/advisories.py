"""The RustSec advisory database as cargo-audit reads it, from a local checkout.

Layout: `<root>/crates/<crate>/RUSTSEC-YYYY-NNNN.md`; each file opens with a ```toml fenced block
holding `[advisory]` (id, package, date, informational, withdrawn, ...) and `[versions]` (patched,
unaffected), then Markdown whose first `# ` heading is the title. Everything in it is outside input:
names and file names are checked against fixed patterns, sizes and counts are capped, and a file that
does not parse is left out (and listed in `errors`) rather than taking the whole database down.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cratemirror.names import InvalidRequest, parse_name
from cratemirror.versions import (
    RequirementError,
    UnaffectedRange,
    Version,
    is_vulnerable,
    unaffected_ranges,
)

log = logging.getLogger("cratemirror.policy")

MAX_ADVISORY_BYTES = 256 * 1024
# Real advisories nest two or three levels; deeper front matter is refused before the TOML parser
# (recursive: `x = [[[...]]]` of 50k levels would raise RecursionError) ever sees it.
MAX_NESTING = 32
MAX_ADVISORIES = 50_000
MAX_ERRORS_KEPT = 50
ADVISORY_FILE_RE = re.compile(r"RUSTSEC-(\d{4})-(\d{4})\.md")
ADVISORY_ID_RE = re.compile(r"RUSTSEC-\d{4}-\d{4}")
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
CRATES_IO_SOURCES = (
    "registry+https://github.com/rust-lang/crates.io-index",
    "sparse+https://index.crates.io/",
)


class AdvisoryError(ValueError):
    """One advisory file that cannot be read; str() names the file and the problem."""


@dataclass(frozen=True, slots=True)
class Advisory:
    id: str
    package: str
    date: str
    title: str
    informational: str | None  # unmaintained | unsound | notice | another word; None: a vulnerability
    withdrawn: str | None
    ranges: tuple[UnaffectedRange, ...]  # patched + unaffected; a version in none of them is affected
    patched: tuple[str, ...]
    url: str | None = None

    def affects(self, version: Version) -> bool:
        return is_vulnerable(version, self.ranges)


def _front_matter(text: str, origin: str) -> tuple[str, str]:
    if not text.startswith("```toml\n"):
        raise AdvisoryError(f"{origin}: does not start with a ```toml block")
    end = text.find("\n```", len("```toml"))
    if end < 0:
        raise AdvisoryError(f"{origin}: the ```toml block is not closed")
    return text[len("```toml\n") : end + 1], text[end + 4 :]


def _title(markdown: str) -> str:
    for line in markdown.splitlines():
        if line.startswith("# "):
            return line[2:].strip()[:200]
    return ""


def _strings(value: object, origin: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value) or len(value) > 64:
        raise AdvisoryError(f"{origin}: {key} must be a list of version requirements")
    return list(value)


def _check_nesting(toml_text: str, origin: str) -> None:
    """AdvisoryError if brackets or braces open deeper than MAX_NESTING, over the whole block (line
    breaks and strings counted too: a conservative bound that real advisories never come near)."""
    depth = 0
    for char in toml_text:
        if char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise AdvisoryError(f"{origin}: nested deeper than {MAX_NESTING} levels")
        elif char in "]}":
            depth = max(0, depth - 1)


def parse_advisory(text: str, origin: str, crate_dir: str) -> Advisory:
    """One advisory file's text; `crate_dir` is the directory it lies in (the package must match)."""
    toml_text, markdown = _front_matter(text, origin)
    _check_nesting(toml_text, origin)
    try:
        document = tomllib.loads(toml_text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise AdvisoryError(f"{origin}: not valid TOML: {str(exc)[:200]}") from None
    meta = document.get("advisory")
    if not isinstance(meta, dict):
        raise AdvisoryError(f"{origin}: no [advisory] table")
    advisory_id, package, date = meta.get("id"), meta.get("package"), meta.get("date")
    if not isinstance(advisory_id, str) or not ADVISORY_ID_RE.fullmatch(advisory_id):
        raise AdvisoryError(f"{origin}: advisory.id is not RUSTSEC-YYYY-NNNN")
    if not isinstance(package, str) or package.lower() != crate_dir.lower():
        raise AdvisoryError(f"{origin}: advisory.package does not name the crate directory {crate_dir!r}")
    date_text = str(date) if date is not None else ""
    if not DATE_RE.fullmatch(date_text):
        raise AdvisoryError(f"{origin}: advisory.date is not YYYY-MM-DD")
    informational = meta.get("informational")
    if informational is not None and not isinstance(informational, str):
        raise AdvisoryError(f"{origin}: advisory.informational is not a string")
    withdrawn = meta.get("withdrawn")
    source = meta.get("source")
    url = meta.get("url")
    versions = document.get("versions", {})
    if not isinstance(versions, dict):
        raise AdvisoryError(f"{origin}: [versions] is not a table")
    patched = _strings(versions.get("patched", []), origin, "versions.patched")
    unaffected = _strings(versions.get("unaffected", []), origin, "versions.unaffected")
    try:
        ranges = unaffected_ranges(unaffected + patched)
    except RequirementError as exc:
        raise AdvisoryError(f"{origin}: [versions]: {exc}") from None
    if isinstance(source, str) and source not in CRATES_IO_SOURCES:
        raise AdvisoryError(f"{origin}: about a crate of another registry ({source[:80]}); not applied")
    return Advisory(
        id=advisory_id,
        package=package,
        date=date_text,
        title=_title(markdown) or str(meta.get("title", ""))[:200],
        informational=informational.lower() if informational else None,
        withdrawn=str(withdrawn) if withdrawn else None,
        ranges=ranges,
        patched=tuple(patched),
        url=url if isinstance(url, str) and len(url) < 500 else None,
    )


@dataclass(frozen=True, slots=True)
class AdvisoryFile:
    crate_dir: str
    path: Path
    mtime_ns: int
    size: int


def scan(root: Path) -> Iterator[AdvisoryFile]:
    """The advisory files of a checkout whose names follow the rules; nothing else is even opened."""
    crates = root / "crates"
    try:
        directories = sorted(os.scandir(crates), key=lambda entry: entry.name)
    except OSError:
        return
    count = 0
    for directory in directories:
        try:
            parse_name(directory.name)
            if not directory.is_dir(follow_symlinks=False):
                continue
            files = sorted(os.scandir(directory.path), key=lambda entry: entry.name)
        except (InvalidRequest, OSError):
            continue
        for file in files:
            if not ADVISORY_FILE_RE.fullmatch(file.name):
                continue
            try:
                if not file.is_file(follow_symlinks=False):
                    continue
                stat = file.stat(follow_symlinks=False)
            except OSError:
                continue
            count += 1
            if count > MAX_ADVISORIES:
                return
            yield AdvisoryFile(directory.name, Path(file.path), stat.st_mtime_ns, stat.st_size)


def _fingerprint(files: list[AdvisoryFile]) -> str:
    if not files:
        return ""
    digest = hashlib.sha256()
    for item in files:
        digest.update(f"{item.crate_dir}/{item.path.name}:{item.mtime_ns}:{item.size}\n".encode())
    return digest.hexdigest()[:16]


def signature(root: Path | None) -> str:
    """Changes whenever an advisory file is added, removed or rewritten: a walk of stats, no reads."""
    return "" if root is None else _fingerprint(list(scan(root)))


@dataclass
class AdvisoryDb:
    root: Path | None = None
    signature: str = ""
    by_crate: dict[str, tuple[Advisory, ...]] = field(default_factory=dict)  # key: lowercased name
    count: int = 0
    newest_date: str | None = None  # the newest advisory's date: how current the checkout is
    changed_at: float | None = None  # the newest file's mtime
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS_KEPT files left out, why
    failed: int = 0  # advisory files left out because they could not be read

    def for_crate(self, name: str) -> tuple[Advisory, ...]:
        return self.by_crate.get(name.lower(), ())


def load(root: Path | None) -> AdvisoryDb:
    """Read every advisory of a checkout (None: an empty database)."""
    if root is None:
        return AdvisoryDb()
    files = list(scan(root))
    by_crate: dict[str, list[Advisory]] = {}
    db = AdvisoryDb(root)
    for item in files:
        origin = f"{item.crate_dir}/{item.path.name}"
        try:
            if item.size > MAX_ADVISORY_BYTES:
                raise AdvisoryError(f"{origin}: larger than {MAX_ADVISORY_BYTES} bytes")
            with open(item.path, "rb") as handle:
                text = handle.read(MAX_ADVISORY_BYTES + 1).decode("utf-8")
            advisory = parse_advisory(text, origin, item.crate_dir)
            if advisory.id != item.path.stem:
                raise AdvisoryError(f"{origin}: advisory.id {advisory.id} differs from the file name")
        except Exception as exc:  # one file, whatever is wrong with it, never takes the rest down
            db.failed += 1
            if len(db.errors) < MAX_ERRORS_KEPT:
                reason = str(exc) if isinstance(exc, AdvisoryError) else f"{origin}: {type(exc).__name__}"
                db.errors.append(reason[:300])
                log.warning("advisory file left out: %s", reason[:300])
            continue
        by_crate.setdefault(item.crate_dir.lower(), []).append(advisory)
        db.count += 1
        if db.newest_date is None or advisory.date > db.newest_date:
            db.newest_date = advisory.date
        mtime = item.mtime_ns / 1e9
        if db.changed_at is None or mtime > db.changed_at:
            db.changed_at = mtime
    db.signature = _fingerprint(files)
    db.by_crate = {name: tuple(advisories) for name, advisories in by_crate.items()}
    return db
