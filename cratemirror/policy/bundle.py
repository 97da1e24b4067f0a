"""The advisory database in an export bundle, for mirrors behind an air gap.

Export (`cratemirror export --advisory-db`) adds `advisory-db/crates/<name>/RUSTSEC-YYYY-NNNN.md` for every
advisory file of `policy.advisory_db` and lists them (path, sha256, size) under `advisory_db` in the
manifest. Import checks every one strictly (the path rebuilt from a valid crate name and file name,
size capped, sha256 as listed) and, only if all of them pass, replaces the `crates/` directory of the
importing mirror's `policy.advisory_db` in one rename; a running server picks it up on its next check.

A bundle never wipes or rolls back the db in place: one with no readable advisory, or whose newest
advisory is older than the newest one installed, is refused unless the operator says
`--replace-advisory-db`. What an install changed (added, removed, rewritten files; the newest date
before and after) is reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cratemirror.names import InvalidRequest, parse_name
from cratemirror.policy.advisories import (
    ADVISORY_FILE_RE,
    MAX_ADVISORIES,
    MAX_ADVISORY_BYTES,
    AdvisoryError,
    load,
    parse_advisory,
    scan,
)

PREFIX = "advisory-db/"
MANIFEST_KEY = "advisory_db"


def export_advisory_db(tar: tarfile.TarFile, root: Path) -> dict[str, Any]:
    """Add the checkout's advisory files to the bundle; the manifest's `advisory_db` section."""
    files = []
    for item in scan(root):
        if item.size > MAX_ADVISORY_BYTES:
            continue
        body = item.path.read_bytes()[: MAX_ADVISORY_BYTES + 1]
        relative = f"crates/{item.crate_dir}/{item.path.name}"
        info = tarfile.TarInfo(PREFIX + relative)
        info.size = len(body)
        info.mtime = item.mtime_ns // 1_000_000_000
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(body))
        files.append({"path": relative, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)})
    return {"files": files}


@dataclass
class DbImport:
    installed: int = 0
    target: Path | None = None
    refused: list[str] = field(default_factory=list)
    changes: str = ""  # one line: what the install changed


def _newest(files: dict[tuple[str, str], bytes]) -> tuple[int, str | None]:
    """(readable advisories, the newest one's date) among a bundle's verified files."""
    count, newest = 0, None
    for (crate, name), body in files.items():
        try:
            advisory = parse_advisory(body.decode("utf-8"), f"{crate}/{name}", crate)
        except (AdvisoryError, UnicodeDecodeError, RecursionError):
            continue
        count += 1
        newest = advisory.date if newest is None or advisory.date > newest else newest
    return count, newest


def _current(target: Path) -> dict[tuple[str, str], bytes]:
    return {
        (item.crate_dir, item.path.name): item.path.read_bytes()[: MAX_ADVISORY_BYTES + 1]
        for item in scan(target)
    }


def _rollback_refusal(target: Path, files: dict[tuple[str, str], bytes]) -> str | None:
    """Why installing `files` would wipe or roll back the db in place; None if it would not."""
    installed = load(target)
    if installed.count == 0:
        return None
    count, newest = _newest(files)
    if count == 0:
        return (
            f"advisory db: the bundle holds no readable advisory, and {target} holds {installed.count}: "
            "not wiped (--replace-advisory-db to install it anyway)"
        )
    if installed.newest_date is not None and (newest is None or newest < installed.newest_date):
        return (
            f"advisory db: the bundle's newest advisory is from {newest}, older than the newest in "
            f"{target} ({installed.newest_date}): not rolled back "
            "(--replace-advisory-db to install it anyway)"
        )
    return None


def _changes(before: dict[tuple[str, str], bytes], after: dict[tuple[str, str], bytes]) -> str:
    added = len(after.keys() - before.keys())
    removed = len(before.keys() - after.keys())
    rewritten = sum(1 for key in after.keys() & before.keys() if after[key] != before[key])
    newest_before, newest_after = _newest(before)[1], _newest(after)[1]
    return (
        f"{added} added, {removed} removed, {rewritten} rewritten; newest advisory "
        f"{newest_before or '-'} -> {newest_after or '-'}"
    )


def _relative_path(entry: object) -> tuple[str, str, str]:
    """(crate dir, file name, sha256) of a manifest entry, or ValueError: the path is rebuilt from parts
    that passed the name rules, never used as given."""
    if not isinstance(entry, dict):
        raise ValueError("not an object")
    path, digest, size = entry.get("path"), entry.get("sha256"), entry.get("size")
    parts = path.split("/") if isinstance(path, str) else []
    if len(parts) != 3 or parts[0] != "crates" or not ADVISORY_FILE_RE.fullmatch(parts[2]):
        raise ValueError(f"path {path!r} is not crates/<name>/RUSTSEC-YYYY-NNNN.md")
    try:
        parse_name(parts[1])
    except InvalidRequest as exc:
        raise ValueError(f"path {path!r}: {exc}") from None
    if (
        not isinstance(digest, str)
        or len(digest) != 64
        or not isinstance(size, int)
        or size > MAX_ADVISORY_BYTES
    ):
        raise ValueError(f"path {path!r}: bad sha256 or size")
    return parts[1], parts[2], digest


def import_advisory_db(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    manifest: dict[str, Any],
    target: Path | None,
    replace: bool = False,
) -> DbImport:
    """Verify and install the bundle's advisory db; pops its members from `members` either way.
    `replace`: install it even if it is empty or older than the db in place."""
    result = DbImport(target=target)
    ours = {name: members.pop(name) for name in [name for name in members if name.startswith(PREFIX)]}
    section = manifest.get(MANIFEST_KEY)
    if section is None and not ours:
        return result
    entries = section.get("files") if isinstance(section, dict) else None
    if not isinstance(entries, list) or len(entries) > MAX_ADVISORIES:
        result.refused.append("advisory db: the manifest's advisory_db.files is missing or too long")
        return result
    if target is None:
        result.refused.append("advisory db: policy.advisory_db is not set, so there is nowhere to install it")
        return result
    files: dict[tuple[str, str], bytes] = {}
    for entry in entries:
        try:
            crate, name, digest = _relative_path(entry)
            member = ours.pop(f"{PREFIX}crates/{crate}/{name}", None)
            if member is None or member.size > MAX_ADVISORY_BYTES:
                raise ValueError(f"crates/{crate}/{name}: missing from the bundle or too large")
            handle = tar.extractfile(member)
            assert handle is not None  # safe_members lets only regular files through
            body = handle.read(MAX_ADVISORY_BYTES + 1)
            if hashlib.sha256(body).hexdigest() != digest:
                raise ValueError(f"crates/{crate}/{name}: does not hash to the manifest's sha256")
        except ValueError as exc:
            result.refused.append(f"advisory db: {exc}")
            continue
        files[(crate, name)] = body
    result.refused.extend(f"advisory db: {name!r} is not listed in the manifest" for name in sorted(ours))
    if result.refused:
        result.refused.append("advisory db: not installed (every file must pass)")
        return result
    refusal = None if replace else _rollback_refusal(target, files)
    if refusal is not None:
        result.refused.append(refusal)
        return result
    before = _current(target)
    _install(target, files)
    result.installed = len(files)
    result.changes = _changes(before, files)
    return result


def _install(target: Path, files: dict[tuple[str, str], bytes]) -> None:
    """Write the new crates/ beside the old one, then swap them with renames."""
    target.mkdir(parents=True, exist_ok=True)
    fresh = target / f".crates.import-{os.getpid()}"
    old = target / f".crates.old-{os.getpid()}"
    shutil.rmtree(fresh, ignore_errors=True)
    for (crate, name), body in files.items():
        path = fresh / crate / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    fresh.mkdir(exist_ok=True)
    current = target / "crates"
    with contextlib.suppress(FileNotFoundError):
        current.rename(old)
    fresh.rename(current)
    shutil.rmtree(old, ignore_errors=True)
