"""`cratemirror warm --toolchain SPEC [--profile P] [--target T]` and `warm path/to/rust-toolchain.toml`:
fetch a toolchain's verified channel manifest and the component files rustup would download for it.

What is fetched is what rustup asks for: the manifest of the channel (`stable`, `1.79`, `1.79.0`,
`nightly-2024-06-13`, ...), then for the host triple each component of the profile (`[profiles]` of the
manifest) plus the named components, and `rust-std` for every extra target. Directly into the
configured cache dir through the server's own ToolchainService (signature and hash checks included),
or through a running mirror with --mirror (each file hashed against the verified manifest here too).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import re
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cratemirror.cache.delivery import CacheResult, Failed, FromFile, FromFill, HeadersOnly
from cratemirror.cache.toolchains.paths import (
    Kind,
    ToolchainPath,
    component_path_of_url,
    parse_toolchain_path,
)
from cratemirror.config.schema import Config, ConfigError
from cratemirror.http.app import create_app
from cratemirror.http.toolchains import TOOLCHAINS
from cratemirror.names import InvalidRequest
from cratemirror.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    MirrorClient,
    ServerApp,
    answer_reason,
    body_sha256,
    error,
    tool_config,
)

FETCHED = "fetched"
CACHED = "already cached"
PROFILES = ("minimal", "default", "complete")
_SPEC_RE = re.compile(
    r"(?P<channel>stable|beta|nightly|\d{1,3}\.\d{1,3}(?:\.\d{1,3})?)(?:-(?P<date>\d{4}-\d{2}-\d{2}))?"
)
_COMPRESSIONS = (("zst_url", "zst_hash"), ("xz_url", "xz_hash"), ("url", "hash"))  # rustup's preference


class WarmFailure(Exception):
    """One file could not be warmed; str() is the one-line reason."""


@dataclass(frozen=True, slots=True)
class ToolchainRequest:
    spec: str
    manifest: ToolchainPath
    profile: str = "default"
    components: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()


def host_triple() -> str:
    """The triple of the machine warm runs on (what a runner like it asks rustup for)."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    if sys.platform == "darwin":
        return f"{machine}-apple-darwin"
    if sys.platform == "win32":
        return f"{machine}-pc-windows-msvc"
    return f"{machine or 'x86_64'}-unknown-linux-gnu"


def parse_spec(
    spec: str, profile: str = "default", components: Sequence[str] = (), targets: Sequence[str] = ()
) -> ToolchainRequest:
    """`stable`, `beta`, `nightly`, `1.79`, `1.79.0`, with an optional `-YYYY-MM-DD`."""
    match = _SPEC_RE.fullmatch(spec.strip())
    if match is None:
        raise ConfigError(
            "--toolchain: expected a channel like stable, beta, nightly, 1.79, 1.79.0 or "
            f"nightly-2024-06-13, got {spec[:80]!r}"
        )
    channel, date = match.group("channel"), match.group("date")
    path = f"dist/{date}/channel-rust-{channel}.toml" if date else f"dist/channel-rust-{channel}.toml"
    try:
        manifest = parse_toolchain_path(path)
    except InvalidRequest as exc:
        raise ConfigError(f"--toolchain {spec}: {exc}") from None
    if profile not in PROFILES:
        raise ConfigError(f"--profile: expected one of {', '.join(PROFILES)}, got {profile!r}")
    return ToolchainRequest(spec, manifest, profile, tuple(components), tuple(targets))


def read_toolchain_file(path: Path) -> ToolchainRequest:
    """A `rust-toolchain.toml` ([toolchain] channel, components, targets, profile) or a legacy
    `rust-toolchain` file holding only the channel, as rustup reads them."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if "[toolchain]" not in text and "\n" not in text.strip():
        return parse_spec(text.strip())
    try:
        section = tomllib.loads(text).get("toolchain")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not TOML: {exc}") from None
    if not isinstance(section, dict) or not isinstance(section.get("channel"), str):
        raise ConfigError(f"{path}: toolchain.channel: expected a channel like stable or 1.79.0")

    def strings(key: str) -> tuple[str, ...]:
        value = section.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{path}: toolchain.{key}: expected a list of strings")
        return tuple(value)

    profile = section.get("profile", "default")
    if not isinstance(profile, str):
        raise ConfigError(f"{path}: toolchain.profile: expected one of {', '.join(PROFILES)}")
    return parse_spec(section["channel"], profile, strings("components"), strings("targets"))


def wanted_files(manifest: bytes, request: ToolchainRequest, host: str) -> list[tuple[ToolchainPath, str]]:
    """(path, sha256) of every file rustup would download for this request on `host`."""
    document: dict[str, Any] = tomllib.loads(manifest.decode("utf-8"))
    renames = {
        old: entry["to"] for old, entry in document.get("renames", {}).items() if isinstance(entry, dict)
    }
    packages: dict[str, Any] = document.get("pkg", {})
    profile = document.get("profiles", {}).get(request.profile, [])
    wanted: list[tuple[str, str]] = [
        (renames.get(name, name), host) for name in [*profile, *request.components]
    ]
    wanted += [("rust-std", target) for target in request.targets]
    files: dict[str, tuple[ToolchainPath, str]] = {}
    for name, triple in wanted:
        targets = packages.get(name, {}).get("target", {})
        entry = targets.get(triple) or targets.get("*")
        if not isinstance(entry, dict) or entry.get("available") is False:
            continue  # rustup skips what a profile names but the platform lacks
        for url_key, hash_key in _COMPRESSIONS:
            url, digest = entry.get(url_key), entry.get(hash_key)
            if isinstance(url, str) and isinstance(digest, str):
                path = component_path_of_url(url)
                if path is not None:
                    files[path.path] = (path, digest)
                break
    return list(files.values())


class Source(Protocol):
    async def manifest(self, path: ToolchainPath) -> bytes: ...

    async def fetch(self, path: ToolchainPath, sha256: str) -> str: ...


class DirectSource(ServerApp):
    """The server's own ToolchainService on the configured cache dir."""

    def __init__(self, config: Config) -> None:
        app = create_app(config)
        if TOOLCHAINS not in app:
            raise ConfigError(f"{config.source}: toolchains.upstream: expected a URL (toolchains are off)")
        super().__init__(app)
        self.service = app[TOOLCHAINS]

    async def manifest(self, path: ToolchainPath) -> bytes:
        delivery = await self.service.deliver(path)
        if isinstance(delivery, Failed):
            raise WarmFailure(delivery.reason)
        assert isinstance(delivery, FromFile)
        with delivery.file:
            return delivery.file.read()

    async def fetch(self, path: ToolchainPath, sha256: str) -> str:
        delivery = await self.service.deliver(path)
        match delivery:
            case FromFile(file=file, headers=headers):
                file.close()
                return CACHED if headers.get("X-Cache") == CacheResult.HIT else FETCHED
            case FromFill(body=body, release=release):
                try:
                    await body.finished  # verified against the manifest and stored (or raised)
                finally:
                    release()
                return FETCHED
            case Failed(reason=reason):
                raise WarmFailure(reason)
            case HeadersOnly():
                raise WarmFailure("no body")
        raise WarmFailure(f"unexpected answer {type(delivery).__name__}")


class MirrorSource(MirrorClient):
    """A running mirror, asked like rustup asks it; every file hashed here against the manifest."""

    def __init__(self, base: str) -> None:
        super().__init__(base, "cratemirror-warm", sock_read=300)

    async def manifest(self, path: ToolchainPath) -> bytes:
        async with self.session.get(f"{self.base}/toolchains/{path.path}") as response:
            if response.status != 200:
                raise WarmFailure(f"the mirror answered {response.status} for {path.path}")
            return await response.read()

    async def fetch(self, path: ToolchainPath, sha256: str) -> str:
        async with self.session.get(f"{self.base}/toolchains/{path.path}") as response:
            if response.status != 200:
                raise WarmFailure(f"the mirror answered {response.status}: {await answer_reason(response)}")
            digest = await body_sha256(response)
            if digest != sha256:
                raise WarmFailure(f"the mirror sent bytes hashing to {digest}, not {sha256}")
            return CACHED if response.headers.get("X-Cache") == CacheResult.HIT else FETCHED


async def warm_toolchain(source: Source, request: ToolchainRequest, host: str, jobs: int) -> bool:
    """Warm one toolchain; prints one line per failure and a summary; True if everything was warmed."""
    try:
        manifest = await source.manifest(request.manifest)
        files = wanted_files(manifest, request, host)
    except (WarmFailure, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        print(f"warm: FAILED toolchain {request.spec}: {exc}", file=sys.stderr)
        return False
    semaphore = asyncio.BoundedSemaphore(jobs)
    outcomes: list[str] = []

    async def one(path: ToolchainPath, digest: str) -> None:
        async with semaphore:
            try:
                outcomes.append(await source.fetch(path, digest))
            except Exception as exc:
                outcomes.append("failed")
                print(f"warm: FAILED {path.path}: {exc}", file=sys.stderr)

    await asyncio.gather(*(one(path, digest) for path, digest in files if path.kind is Kind.COMPONENT))
    failed = outcomes.count("failed")
    targets = "".join(f" +{target}" for target in request.targets)
    print(
        f"warm: toolchain {request.spec} ({request.profile}, {host}{targets}): {len(files)} files: "
        f"{outcomes.count(FETCHED)} fetched, {outcomes.count(CACHED)} already cached, {failed} failed"
    )
    return failed == 0 and bool(files)


async def _run(source: DirectSource | MirrorSource, requests: Sequence[ToolchainRequest], jobs: int) -> bool:
    host = host_triple()
    async with source:
        results = [await warm_toolchain(source, request, host, jobs) for request in requests]
    return all(results)


def toolchain_requests(args: argparse.Namespace, files: Sequence[str]) -> list[ToolchainRequest]:
    requests = [read_toolchain_file(Path(path)) for path in files]
    for spec in args.toolchain or []:
        requests.append(parse_spec(spec, args.profile or "default", (), tuple(args.target or ())))
    return requests


def run_warm_toolchains(args: argparse.Namespace, files: Sequence[str]) -> int:
    requests = toolchain_requests(args, files)
    source: DirectSource | MirrorSource
    if args.mirror is not None:
        from cratemirror.tools.warm import mirror_base

        source = MirrorSource(mirror_base(args.mirror))
    else:
        config = tool_config(args)
        try:
            source = DirectSource(config)
        except OSError as exc:
            return error(f"cannot open the cache dir {config.cache.dir}: {exc.strerror or exc}")
    try:
        ok = asyncio.run(_run(source, requests, args.jobs))
    except OSError as exc:
        return error(f"warm stopped: {exc.strerror or exc}")
    return EXIT_OK if ok else EXIT_FAILURE


def is_toolchain_file(path: str) -> bool:
    return Path(path).name in ("rust-toolchain.toml", "rust-toolchain")
