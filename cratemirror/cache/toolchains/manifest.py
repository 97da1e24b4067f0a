"""What a verified channel manifest says: the sha256 of every component file it names.

Parsed with tomllib from bytes whose signature already verified; still bounded (size is capped by the
fetch, the count of entries here), and every URL is turned into a validated ToolchainPath or dropped.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass

from cratemirror.cache.toolchains.paths import component_path_of_url

MAX_ENTRIES = 200_000
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_URL_KEYS = (("url", "hash"), ("xz_url", "xz_hash"), ("zst_url", "zst_hash"))


class BadManifest(Exception):
    """Not a channel manifest rustup could use."""


@dataclass(frozen=True, slots=True)
class ManifestHashes:
    date: str | None
    hashes: dict[str, str]  # component path ("dist/<date>/<file>") -> sha256


def parse_manifest(body: bytes, what: str) -> ManifestHashes:
    try:
        document = tomllib.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise BadManifest(f"{what}: not a TOML channel manifest ({exc})") from None
    if document.get("manifest-version") != "2":
        raise BadManifest(f"{what}: not a version 2 channel manifest")
    date = document.get("date")
    packages = document.get("pkg")
    if not isinstance(packages, dict):
        raise BadManifest(f"{what}: no [pkg] table")
    hashes: dict[str, str] = {}
    for package in packages.values():
        targets = package.get("target") if isinstance(package, dict) else None
        if not isinstance(targets, dict):
            continue
        for target in targets.values():
            if not isinstance(target, dict) or target.get("available") is False:
                continue
            for url_key, hash_key in _URL_KEYS:
                url, digest = target.get(url_key), target.get(hash_key)
                if not isinstance(url, str) or not isinstance(digest, str):
                    continue
                if not _SHA256_RE.fullmatch(digest):
                    continue
                path = component_path_of_url(url)
                if path is not None:
                    hashes[path.path] = digest
                    if len(hashes) > MAX_ENTRIES:
                        raise BadManifest(f"{what}: more than {MAX_ENTRIES} files")
    return ManifestHashes(date if isinstance(date, str) else None, hashes)
