"""`verify` and `prune` for toolchain files (cache.dir/toolchains/), run after the crates' part.

verify: every stored manifest must still verify against toolchains.signing_key; every component must be
named by a stored manifest and hash to its sha256; rustup-init must hash to its recorded sha256. With
--fix the bad files are removed (fetched again, verified, on the next request). prune: components and
rustup-init files beyond toolchains.max_size (or --max-size), least recently used first.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from cratemirror.cache.toolchains.files import ToolchainFiles
from cratemirror.cache.toolchains.manifest import BadManifest, parse_manifest
from cratemirror.cache.toolchains.paths import Kind
from cratemirror.cache.toolchains.signature import BadSignature, SignatureVerifier
from cratemirror.config.schema import Config
from cratemirror.fleet.storage.disk import sha256_stream
from cratemirror.tools.common import EXIT_FAILURE, EXIT_OK, format_size, plural


@dataclass
class ToolchainReport:
    checked: int = 0
    problems: list[tuple[Path, str]] = field(default_factory=list)


def stored_toolchains(config: Config) -> ToolchainFiles | None:
    files = ToolchainFiles(config.cache.dir / "toolchains")
    return files if files.files_dir.is_dir() else None


async def _check(files: ToolchainFiles, verifier: SignatureVerifier) -> ToolchainReport:
    report = ToolchainReport()
    stored = await asyncio.to_thread(files.iter_stored)
    hashes: dict[str, str] = {}
    for key, path, _ in stored:
        if key.kind is not Kind.MANIFEST:
            continue
        report.checked += 1
        manifest = files.read_manifest(key)
        try:
            if manifest is None:
                raise BadSignature(f"{key.path}: its signature file is missing")
            await verifier.verify(manifest.body, manifest.signature, key.path)
            hashes.update(parse_manifest(manifest.body, key.path).hashes)
        except (BadSignature, BadManifest) as exc:
            report.problems.append((path, f"CORRUPT {exc}"))
    for key, path, _ in stored:
        if key.kind is Kind.COMPONENT:
            expected = hashes.get(key.path)
        elif key.kind is Kind.RUSTUP_INIT:
            with contextlib.suppress(OSError):
                expected = path.with_name(path.name + ".sha256").read_text().strip()[:64]
        else:
            continue
        report.checked += 1
        if expected is None:
            report.problems.append((path, f"ORPHANED {key.path}: no verified manifest or sha256 names it"))
            continue
        with open(path, "rb") as handle:
            digest, _ = await asyncio.to_thread(sha256_stream, handle)
        if digest != expected:
            report.problems.append((path, f"CORRUPT {key.path}: hashes to {digest}, expected {expected}"))
    return report


def verify_toolchains(config: Config, fix: bool) -> int:
    files = stored_toolchains(config)
    if files is None:
        return EXIT_OK
    verifier = SignatureVerifier(config.toolchains.signing_key)
    try:
        report = asyncio.run(_check(files, verifier))
    finally:
        verifier.close()
    for _, line in report.problems:
        print(f"verify [toolchains]: {line}")
    print(
        f"verify [toolchains]: {plural(report.checked, 'toolchain file')} checked: "
        f"{report.checked - len(report.problems)} ok, {len(report.problems)} bad"
    )
    if not report.problems:
        return EXIT_OK
    if not fix:
        print("verify [toolchains]: run `cratemirror verify --fix` to remove them (fetched again when asked)")
        return EXIT_FAILURE
    for path, _ in report.problems:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    print(f"verify [toolchains]: removed {plural(len(report.problems), 'file')}")
    return EXIT_OK


def prune_toolchains(config: Config, max_size: int | None, dry_run: bool) -> None:
    files = stored_toolchains(config)
    if files is None:
        return
    bound = config.toolchains.max_size if max_size is None else max_size
    if dry_run:
        usage = files.usage()
        print(
            f"prune [toolchains]: dry run: {format_size(usage.size)} in {plural(usage.entries, 'file')} "
            f"(max {format_size(bound)}); nothing was removed"
        )
        return
    removed, removed_bytes = files.evict_to(bound)
    print(
        f"prune [toolchains]: removed {plural(removed, 'file')} ({format_size(removed_bytes)}), "
        f"max {format_size(bound)}"
    )
