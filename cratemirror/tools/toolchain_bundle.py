"""Toolchains in air-gap bundles: `export --toolchain SPEC` and their half of `import`.

The bundle carries one member `toolchains.tar` (its own uncompressed tar):

    toolchains.json                         every file: path, sha256, size (written last)
    dist/.../channel-rust-<ch>.toml(.asc)   the verified manifests with their signatures
    dist/<date>/<component>.tar.*           the cached components those manifests name

Export takes what the cache holds for each channel (warm it first) and re-hashes every component against
its manifest on the way out. Import trusts nothing in it: each manifest must verify against this
mirror's `toolchains.signing_key`, each component must be named by one of those manifests and hash to its
sha256, and member paths are parsed (paths.py) before any file is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cratemirror.cache.toolchains.files import ToolchainFiles
from cratemirror.cache.toolchains.manifest import BadManifest, parse_manifest
from cratemirror.cache.toolchains.paths import Kind, parse_toolchain_path
from cratemirror.cache.toolchains.signature import BadSignature, SignatureVerifier
from cratemirror.config.schema import Config
from cratemirror.fleet.storage.disk import sha256_stream
from cratemirror.names import InvalidRequest
from cratemirror.tools.warm_toolchains import parse_spec

MEMBER = "toolchains.tar"
INDEX = "toolchains.json"
CHUNK = 1024 * 1024
MAX_INDEX = 16 * 1024 * 1024
MAX_MANIFEST = 32 * 1024 * 1024
MAX_SIGNATURE = 64 * 1024
MAX_FILE = 2 * 1024 * 1024 * 1024


@dataclass
class ToolchainCounts:
    files: int = 0
    size: int = 0
    problems: list[str] = field(default_factory=list)


def _add(tar: tarfile.TarFile, name: str, source: IO[bytes], size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(time.time()), 0o644
    tar.addfile(info, source)


def export_toolchains(config: Config, specs: Sequence[str], target: Path) -> ToolchainCounts:
    """Write `target` (the inner toolchains.tar) with the cached files of each channel in `specs`."""
    files = ToolchainFiles(config.cache.dir / "toolchains")
    counts = ToolchainCounts()
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    with open(target, "wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for spec in specs:
            manifest_key = parse_spec(spec).manifest
            stored = files.read_manifest(manifest_key)
            if stored is None:
                counts.problems.append(f"toolchain {spec}: {manifest_key.path} is not cached (warm it first)")
                continue
            try:
                hashes = parse_manifest(stored.body, manifest_key.path).hashes
            except BadManifest as exc:
                counts.problems.append(f"toolchain {spec}: {exc}")
                continue
            for name, body in ((manifest_key.path, stored.body), (manifest_key.signature, stored.signature)):
                if name not in seen:
                    seen.add(name)
                    _add(tar, name, _bytes(body), len(body))
                    entries.append(
                        {"path": name, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
                    )
                    counts.files += 1
                    counts.size += len(body)
            for path, digest in sorted(hashes.items()):
                if path in seen:
                    continue
                key = parse_toolchain_path(path)
                opened = files.open(key)
                if opened is None:
                    continue  # not used here: only what the cache holds travels
                handle, size = opened
                with handle:
                    actual, _ = sha256_stream(handle)
                    if actual != digest:
                        counts.problems.append(
                            f"{path}: the cached file does not match its manifest; left out"
                        )
                        continue
                    handle.seek(0)
                    _add(tar, path, handle, size)
                seen.add(path)
                entries.append({"path": path, "sha256": digest, "size": size})
                counts.files += 1
                counts.size += size
        index = json.dumps({"files": entries}).encode()
        _add(tar, INDEX, _bytes(index), len(index))
    return counts


def _bytes(body: bytes) -> IO[bytes]:
    return io.BytesIO(body)


@dataclass
class ToolchainImport:
    loaded: int = 0
    already: int = 0
    refused: list[str] = field(default_factory=list)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if not member.isfile() or member.size > limit:
        raise ValueError(f"{member.name!r}: not a regular file of at most {limit} bytes")
    handle = tar.extractfile(member)
    assert handle is not None
    return handle.read(limit + 1)[:limit]


def import_toolchains(config: Config, outer: tarfile.TarFile, member: tarfile.TarInfo) -> ToolchainImport:
    """Load the bundle's toolchains.tar into the cache dir: manifests by signature, components by hash."""
    result = ToolchainImport()
    files = ToolchainFiles(config.cache.dir / "toolchains")
    verifier = SignatureVerifier(config.toolchains.signing_key)
    handle = outer.extractfile(member)
    if handle is None:
        result.refused.append(f"{MEMBER}: not a regular file")
        return result
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            members: dict[str, tarfile.TarInfo] = {}
            for inner in tar.getmembers():
                if inner.name in members or not inner.isfile():
                    result.refused.append(f"{MEMBER}/{inner.name!r}: duplicate or not a regular file")
                    continue
                members[inner.name] = inner
            members.pop(INDEX, None)  # a listing for people; every file is checked on its own
            hashes = asyncio.run(_import_manifests(tar, members, files, verifier, result))
            for name, inner in sorted(members.items()):
                _import_component(tar, name, inner, hashes, files, result)
    except tarfile.TarError as exc:
        result.refused.append(f"{MEMBER}: {exc}")
    finally:
        verifier.close()
    return result


async def _import_manifests(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    files: ToolchainFiles,
    verifier: SignatureVerifier,
    result: ToolchainImport,
) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for name in sorted(members):
        try:
            key = parse_toolchain_path(name)
        except InvalidRequest:
            continue  # refused with the components below
        if key.kind is not Kind.MANIFEST:
            continue
        inner = members.pop(name)
        signature_member = members.pop(key.signature, None)
        try:
            if signature_member is None:
                raise BadSignature(f"{name}: no signature ({key.name}.asc) in the bundle")
            body = _read(tar, inner, MAX_MANIFEST)
            signature = _read(tar, signature_member, MAX_SIGNATURE)
            await verifier.verify(body, signature, name)
            parsed = parse_manifest(body, name)
        except (BadSignature, BadManifest, ValueError) as exc:
            result.refused.append(str(exc))
            continue
        hashes.update(parsed.hashes)
        stored = files.read_manifest(key)
        if stored is not None and stored.body == body:
            result.already += 1
            continue
        if stored is not None and key.moving:
            result.already += 1  # the cache's own copy of a moving name is at least as new
            continue
        files.store_manifest(key, body, signature)
        result.loaded += 1
    return hashes


def _import_component(
    tar: tarfile.TarFile,
    name: str,
    inner: tarfile.TarInfo,
    hashes: dict[str, str],
    files: ToolchainFiles,
    result: ToolchainImport,
) -> None:
    try:
        key = parse_toolchain_path(name)
    except InvalidRequest:
        result.refused.append(f"{MEMBER}/{name[:120]!r}: not a toolchain file path")
        return
    expected = hashes.get(key.path)
    if key.kind is not Kind.COMPONENT or expected is None:
        result.refused.append(f"{key.path}: not named by a verified manifest in the bundle")
        return
    if files.path_of(key).exists():
        result.already += 1
        return
    if not inner.isfile() or inner.size > MAX_FILE:
        result.refused.append(f"{key.path}: not a regular file of at most {MAX_FILE} bytes")
        return
    source = tar.extractfile(inner)
    assert source is not None
    temp = files.new_temp_file()
    try:
        hasher = hashlib.sha256()
        with open(temp, "wb") as out:
            while chunk := source.read(CHUNK):
                hasher.update(chunk)
                out.write(chunk)
        if hasher.hexdigest() != expected:
            result.refused.append(f"{key.path}: does not hash to its manifest's sha256")
            return
        files.commit(temp, files.path_of(key))
        result.loaded += 1
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
