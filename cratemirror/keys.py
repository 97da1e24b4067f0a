"""Every lock, coalescing and storage key, built in one place.

Two parts of the mirror that must agree on a key (a fill and the eviction that skips it, a replica's
lock and another's) both call the builder here, so the agreement is code, not a convention. Builders
take validated values (a crate's lowercased name, a parsed version), never raw request text."""

from __future__ import annotations

INDEX_PREFIX = "index:"
CRATE_PREFIX = "crate:"
TOOLCHAIN_PREFIX = "toolchain:"
REFRESH_PREFIX = "refresh:"


def index_key(lower_name: str) -> str:
    """The lock, coalescing and metadata key of one index file (crate names compare lowercased)."""
    return f"{INDEX_PREFIX}{lower_name}"


def refresh_key(lower_name: str) -> str:
    """The coalescing key of `cratemirror refresh` of one index file: refreshes share one upstream
    request with each other, never with a lookup that may be answered from another replica's copy."""
    return f"{REFRESH_PREFIX}{lower_name}"


def crate_key(name: str, version: str) -> str:
    """The fill lock of one .crate: held by the fill, tried by eviction before it unlinks the file."""
    return f"{CRATE_PREFIX}{name}/{version}"


def toolchain_key(path: str) -> str:
    """The fill lock of one toolchain file, by its validated path under /toolchains/."""
    return f"{TOOLCHAIN_PREFIX}{path}"
