"""The bundle format shared by `export` and `import`: one uncompressed tar file.

    crates/<name>/<name>-<version>.crate    the verified tarballs (already gzip: no point compressing again)
    index/<prefix>/<name>                   the sparse-index files, byte for byte
    registries/<name>.tar                   an extra registry's own bundle, in this same format
    toolchains.tar                          rustup toolchain files (export --toolchain; toolchain_bundle.py)
    manifest.json                           written last: format, creation time, upstream dl config,
                                            every crate (name, version, sha256, size, fetched_at) and
                                            every index file (name, sha256 of the body, validators)

Member paths are derived from validated names on both sides; the importer never uses a path it read.
"""

from __future__ import annotations

from typing import Any

from cratemirror.names import index_path

FORMAT = "cratemirror-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOOLCHAINS_MEMBER = "toolchains.tar"  # rustup toolchain files (tools/toolchain_bundle.py)


def crate_member(name: str, version: str) -> str:
    return f"crates/{name}/{name}-{version}.crate"


def index_member(name: str) -> str:
    return f"index/{index_path(name)}"


def registry_member(registry: str) -> str:
    return f"registries/{registry}.tar"


def manifest_document(
    created: str,
    created_by: str,
    upstream_config: dict[str, Any] | None,
    crates: list[dict[str, Any]],
    index_files: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": created,
        "created_by": created_by,
        "upstream_config": upstream_config,
        "crates": crates,
        "index_files": index_files,
    }
