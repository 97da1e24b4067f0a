"""Crate-name and version rules and sparse-index prefix paths.

Everything here is pure. Request text is validated into these small value objects at the edge, and
nothing behind the edge builds a path or URL from raw request text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The name of crates.io among the registries (metrics label, cache layout, config).
DEFAULT_REGISTRY = "crates-io"

MAX_NAME_LENGTH = 64
MAX_VERSION_LENGTH = 150

# crates.io: ASCII, a letter first, then letters, digits, '-' and '_'.
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
# SemVer 2.0 (numeric parts without leading zeros, optional pre-release and build metadata).
_NUM = r"(?:0|[1-9][0-9]*)"
_IDENT = r"[0-9A-Za-z-]+"
_VERSION_RE = re.compile(
    rf"{_NUM}\.{_NUM}\.{_NUM}(?:-{_IDENT}(?:\.{_IDENT})*)?(?:\+{_IDENT}(?:\.{_IDENT})*)?"
)


class InvalidRequest(ValueError):
    """A malformed name, version or index path; str() is the one-line reason sent to the client."""


@dataclass(frozen=True, slots=True)
class CrateName:
    """A crate name that passed crates.io's rules; `name` keeps the case it was given in."""

    name: str

    def __post_init__(self) -> None:
        # The type can only hold a valid name: store paths and object keys are built from it.
        if not _NAME_RE.fullmatch(self.name):
            raise InvalidRequest(f"invalid crate name {self.name[:80]!r}")

    @property
    def lower(self) -> str:
        return self.name.lower()

    @property
    def index_path(self) -> str:
        return index_path(self.name)


@dataclass(frozen=True, slots=True)
class CrateVersion:
    crate: CrateName
    version: str

    def __post_init__(self) -> None:
        if len(self.version) > MAX_VERSION_LENGTH or not _VERSION_RE.fullmatch(self.version):
            raise InvalidRequest(f"invalid version {self.version[:80]!r}")

    @property
    def key(self) -> str:
        return f"{self.crate.name}/{self.version}"


def parse_name(text: str) -> CrateName:
    if not text:
        raise InvalidRequest("empty crate name")
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidRequest(f"crate name longer than {MAX_NAME_LENGTH} characters")
    if not _NAME_RE.fullmatch(text):
        raise InvalidRequest(
            f"invalid crate name {text!r}: expected ASCII letters, digits, '-' or '_', starting with a letter"
        )
    return CrateName(text)


def parse_version(text: str) -> str:
    if len(text) > MAX_VERSION_LENGTH:
        raise InvalidRequest(f"version longer than {MAX_VERSION_LENGTH} characters")
    if not _VERSION_RE.fullmatch(text):
        raise InvalidRequest(f"invalid version {text!r}: expected a semver version like 1.2.3")
    return text


def parse_crate_version(name: str, version: str) -> CrateVersion:
    return CrateVersion(parse_name(name), parse_version(version))


def is_crate_version(name: object, version: object) -> bool:
    """The checks of parse_crate_version as a yes/no, without building values (for bulk validation)."""
    return (
        isinstance(name, str)
        and isinstance(version, str)
        and len(version) <= MAX_VERSION_LENGTH
        and _NAME_RE.fullmatch(name) is not None
        and _VERSION_RE.fullmatch(version) is not None
    )


_CKSUM_RE = re.compile(r"[0-9a-f]{64}")


def is_cksum(text: object) -> bool:
    """Exactly 64 lowercase hex digits, as the index `cksum` field must be."""
    return isinstance(text, str) and _CKSUM_RE.fullmatch(text) is not None


def index_path(name: str) -> str:
    """The sparse-index path of a crate: cargo lowercases the whole name for it."""
    n = name.lower()
    if len(n) == 1:
        return f"1/{n}"
    if len(n) == 2:
        return f"2/{n}"
    if len(n) == 3:
        return f"3/{n[0]}/{n}"
    return f"{n[0:2]}/{n[2:4]}/{n}"


def parse_index_path(path: str) -> CrateName:
    """Validate `<prefix>/<name>` (the part after /index/) and check the prefix belongs to the name."""
    segments = path.split("/")
    name = parse_name(segments[-1])
    expected = index_path(name.name)
    if path != expected:
        # The prefix must be the lowercased one cargo computes; anything else is not an index file.
        raise InvalidRequest(f"index path {path!r} does not match crate {name.name!r}: expected {expected!r}")
    return name


def expand_dl_template(template: str, crate: str, version: str, cksum: str) -> str:
    """Build a download URL from a registry's config.json `dl` value (all five cargo markers)."""
    markers = ("{crate}", "{version}", "{prefix}", "{lowerprefix}", "{sha256-checksum}")
    if not any(marker in template for marker in markers):
        return f"{template}/{crate}/{version}/download"
    prefix = _dl_prefix(crate)
    return (
        template.replace("{crate}", crate)
        .replace("{version}", version)
        .replace("{prefix}", prefix)
        .replace("{lowerprefix}", prefix.lower())
        .replace("{sha256-checksum}", cksum)
    )


def _dl_prefix(name: str) -> str:
    """Like index_path without the final segment, keeping the name's case (cargo's `{prefix}`)."""
    if len(name) == 1:
        return "1"
    if len(name) == 2:
        return "2"
    if len(name) == 3:
        return f"3/{name[0]}"
    return f"{name[0:2]}/{name[2:4]}"
