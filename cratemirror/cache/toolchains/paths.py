"""rustup's dist-server paths, parsed into a validated value before anything else looks at them.

Only the shapes rustup asks for are accepted (what static.rust-lang.org publishes for rustup):

  dist/channel-rust-<channel>.toml[.sha256|.asc]            channel: stable, beta, nightly, X.Y, X.Y.Z
  dist/<YYYY-MM-DD>/channel-rust-<channel>.toml[.sha256|.asc]
  dist/<YYYY-MM-DD>/<component>.tar.{gz,xz,zst}             e.g. rustc-1.79.0-x86_64-unknown-linux-gnu.tar.xz
  rustup/release-stable.toml
  rustup/dist/<triple>/rustup-init[.exe][.sha256]
  rustup/archive/<X.Y.Z>/<triple>/rustup-init[.exe][.sha256]

`ToolchainPath.path` is rebuilt from the validated parts, so it (and the cache path and lock key made
from it) never carries raw request text.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from enum import StrEnum

from cratemirror.names import InvalidRequest

MAX_PATH = 300

_CHANNEL = r"stable|beta|nightly|(?:0|[1-9][0-9]{0,2})\.(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2}))?"
_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_TRIPLE = r"[a-z0-9_]{1,20}(?:-[a-z0-9_.]{1,20}){1,4}"
_VERSION = r"(?:0|[1-9][0-9]{0,3})\.(?:0|[1-9][0-9]{0,3})\.(?:0|[1-9][0-9]{0,3})"
_MANIFEST_RE = re.compile(rf"channel-rust-({_CHANNEL})\.toml(\.sha256|\.asc)?")
# rust-installer tarballs: <pkg>-<version>[-<triple>].tar.<ext>; names are checked against a signed
# manifest before anything is fetched, this only keeps the text a plain file name.
_COMPONENT_RE = re.compile(r"[a-z][a-z0-9_]*(?:[-.+][a-z0-9_]+){1,12}\.tar\.(?:gz|xz|zst)")
_RUSTUP_INIT_RE = re.compile(r"rustup-init(\.exe)?(\.sha256)?")
_FIXED_RE = re.compile(r"[0-9.]+")


class UnknownToolchainPath(InvalidRequest):
    """Well-formed text but no file rustup asks for: 404 rather than 400."""


class Kind(StrEnum):
    MANIFEST = "manifest"  # channel-rust-*.toml, signed
    MANIFEST_SHA256 = "manifest.sha256"  # computed from the manifest served
    MANIFEST_ASC = "manifest.asc"  # the signature that verified the manifest served
    COMPONENT = "component"  # a tarball a verified manifest names, with its hash
    RUSTUP_INIT = "rustup-init"  # checked against upstream's rustup-init.sha256
    RUSTUP_INIT_SHA256 = "rustup-init.sha256"
    RUSTUP_RELEASE = "rustup-release"  # rustup/release-stable.toml: rustup's self-update pointer


@dataclass(frozen=True, slots=True)
class ToolchainPath:
    """A validated path under /toolchains/ (`path`, e.g. "dist/channel-rust-stable.toml")."""

    path: str
    kind: Kind
    moving: bool  # a name whose content changes (revalidated after toolchains.manifest_ttl)
    channel: str | None = None
    date: str | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def file(self) -> ToolchainPath:
        """The stored file a derived answer (.sha256, .asc) is made from."""
        if self.kind in (Kind.MANIFEST_SHA256, Kind.MANIFEST_ASC):
            base = self.path.rsplit(".", 1)[0]
            return ToolchainPath(base, Kind.MANIFEST, self.moving, self.channel, self.date)
        if self.kind is Kind.RUSTUP_INIT_SHA256:
            return ToolchainPath(self.path.rsplit(".", 1)[0], Kind.RUSTUP_INIT, self.moving)
        return self

    @property
    def signature(self) -> str:
        """The upstream path of a manifest's detached signature."""
        return f"{self.file.path}.asc"


def _date(text: str) -> str:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"invalid date {text[:20]!r} in toolchain path") from None
    return text


def _manifest(name: str, date: str | None) -> ToolchainPath | None:
    match = _MANIFEST_RE.fullmatch(name)
    if match is None:
        return None
    channel, suffix = match.group(1), match.group(2)
    kind = {None: Kind.MANIFEST, ".sha256": Kind.MANIFEST_SHA256, ".asc": Kind.MANIFEST_ASC}[suffix]
    # X.Y.Z and dated manifests never change; stable, beta, nightly and X.Y move on.
    moving = date is None and not (_FIXED_RE.fullmatch(channel) and channel.count(".") == 2)
    prefix = "dist/" if date is None else f"dist/{date}/"
    return ToolchainPath(f"{prefix}{name}", kind, moving, channel, date)


def parse_toolchain_path(path: str) -> ToolchainPath:
    """`path` is what follows /toolchains/. InvalidRequest (400) for text that is no such path."""
    if len(path) > MAX_PATH or not path.isascii():
        raise InvalidRequest("invalid toolchain path")
    parts = path.split("/")
    if parts[0] == "dist":
        if len(parts) == 2:
            found = _manifest(parts[1], None)
            if found is not None:
                return found
        elif len(parts) == 3 and re.fullmatch(_DATE, parts[1]):
            date = _date(parts[1])
            found = _manifest(parts[2], date)
            if found is not None:
                return found
            if _COMPONENT_RE.fullmatch(parts[2]):
                return ToolchainPath(f"dist/{date}/{parts[2]}", Kind.COMPONENT, False, None, date)
    elif parts[0] == "rustup":
        if parts[1:] == ["release-stable.toml"]:
            return ToolchainPath("rustup/release-stable.toml", Kind.RUSTUP_RELEASE, True)
        init = _RUSTUP_INIT_RE.fullmatch(parts[-1])
        if init is not None:
            kind = Kind.RUSTUP_INIT_SHA256 if init.group(2) else Kind.RUSTUP_INIT
            if len(parts) == 4 and parts[1] == "dist" and re.fullmatch(_TRIPLE, parts[2]):
                return ToolchainPath(f"rustup/dist/{parts[2]}/{parts[3]}", kind, True)
            if (
                len(parts) == 5
                and parts[1] == "archive"
                and re.fullmatch(_VERSION, parts[2])
                and re.fullmatch(_TRIPLE, parts[3])
            ):
                return ToolchainPath(f"rustup/archive/{parts[2]}/{parts[3]}/{parts[4]}", kind, False)
    raise UnknownToolchainPath("not a toolchain file this mirror serves (rustup's dist/ and rustup/ paths)")


def component_path_of_url(url: str, origin: str = "https://static.rust-lang.org/") -> ToolchainPath | None:
    """A manifest's component URL as the path rustup asks for (rustup swaps `origin` for the dist
    server); None for a URL elsewhere or of another shape."""
    if not url.startswith(origin):
        return None
    try:
        parsed = parse_toolchain_path(url[len(origin) :])
    except InvalidRequest:
        return None
    return parsed if parsed.kind is Kind.COMPONENT else None


def manifest_candidates(component: ToolchainPath) -> list[ToolchainPath]:
    """The dated manifests that may name a component, likeliest first (by the version in its name)."""
    assert component.date is not None
    name = component.name
    order = ["stable", "beta", "nightly"]
    if "-nightly" in name:
        order = ["nightly", "beta", "stable"]
    elif "-beta" in name:
        order = ["beta", "nightly", "stable"]
    return [_manifest(f"channel-rust-{channel}.toml", component.date) for channel in order]  # type: ignore[misc]
