"""What the operator commands share: config loading, the backend (chosen once, here) and its stores,
progress output, sizes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import sys
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TextIO

import aiohttp
from tqdm import tqdm

from cratemirror import __version__
from cratemirror.config.load import find_config_path, load_config
from cratemirror.config.schema import Config, ConfigError, parse_duration
from cratemirror.fleet.storage.disk import Store
from cratemirror.fleet.storage.disk_artifacts import DiskArtifacts
from cratemirror.logsetup import setup_records
from cratemirror.names import DEFAULT_REGISTRY

if TYPE_CHECKING:
    from cratemirror.fleet.storage import ArtifactStore

EXIT_OK = 0
EXIT_FAILURE = 1

CHUNK = 1024 * 1024
# The variable client-config tells cargo users to set for an auth-required mirror; --mirror tools use it too.
MIRROR_TOKEN_ENV = "CARGO_REGISTRIES_MIRROR_TOKEN"


def tool_config(args: argparse.Namespace, overrides: dict[str, object] | None = None) -> Config:
    """The same lookup as `serve`: --config, $CRATEMIRROR_CONFIG, ./mirror.yaml, defaults; env overrides.
    A bad file or value raises ConfigError, which the main entry point turns into exit 2."""
    path = find_config_path(getattr(args, "config", None), os.environ, Path.cwd())
    config = load_config(path, os.environ, overrides or {})
    setup_records(config.logging.level, config.logging.format == "json")
    return config


def duration_flag(flag: str, text: str, example: str) -> float:
    """Seconds from a flag's duration (--since 30d); a bad one is a usage error naming the flag (exit 2)."""
    try:
        return parse_duration(text)
    except ValueError:
        raise ConfigError(f"{flag}: expected a duration like {example}, got {text!r}") from None


def mirror_headers(user_agent: str) -> dict[str, str]:
    """Headers for asking a running mirror: our User-Agent, and its token when one is in the environment."""
    headers = {"User-Agent": user_agent}
    token = os.environ.get(MIRROR_TOKEN_ENV, "").strip()
    if token:
        headers["Authorization"] = token
    return headers


class MirrorClient:
    """One session to a running mirror (--mirror) for the life of `async with`: our User-Agent and the
    token; no overall timeout (a large file may take minutes), at most `sock_read` seconds between reads."""

    def __init__(self, base: str, agent: str, sock_read: float) -> None:
        self.base = base
        self._agent = agent
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=sock_read)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        headers = mirror_headers(f"{self._agent}/{__version__}")
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=headers)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "used outside `async with`"
        return self._session


async def body_sha256(response: aiohttp.ClientResponse) -> str:
    """The sha256 of a response's body, read in chunks and not kept (what --mirror checks a file by)."""
    hasher = hashlib.sha256()
    async for chunk in response.content.iter_chunked(256 * 1024):
        hasher.update(chunk)
    return hasher.hexdigest()


async def answer_reason(response: aiohttp.ClientResponse) -> str:
    """Why a mirror refused, in one line: the first line of its body (a proxy's error page has many)."""
    text = (await response.text(errors="replace")).strip()
    return text.splitlines()[0][:200] if text else response.reason or "no reason given"


class AppLifecycle(Protocol):
    """The server's app (create_app's aiohttp web.Application) as ServerApp drives it; named by these
    methods only, since only http/ and server/ speak aiohttp.web."""

    def freeze(self) -> None: ...

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def cleanup(self) -> None: ...


class ServerApp:
    """For a tool that works through the server's own app: started and stopped by its lifecycle
    (upstream session, stale temp files, closing) for the life of `async with`, as `serve` does."""

    def __init__(self, app: AppLifecycle) -> None:
        self._app = app

    async def __aenter__(self) -> Self:
        self._app.freeze()
        await self._app.startup()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._app.shutdown()
        await self._app.cleanup()


def open_existing_store(config: Config) -> Store:
    """Open the cache dir for verify/prune/export: a missing one is a typo, not an empty cache."""
    if not (config.cache.dir / "meta").is_dir():
        raise ConfigError(
            f"{config.source}: cache.dir: expected an existing cache directory, got {str(config.cache.dir)!r}"
        )
    return Store(config.cache.dir)


def extra_stores(config: Config, create: bool = False) -> list[tuple[str, Store]]:
    """(name, store) of each configured extra registry that has a cache yet (one never asked for has
    nothing to verify, prune or export); `create`: of every one (import)."""
    from cratemirror.cache.registry import registry_cache_dir

    stores = []
    for name in config.registries:
        directory = registry_cache_dir(config.cache.dir, name)
        if create or (directory / "meta").is_dir():
            store = _local_store(directory, create)
            assert store is not None
            stores.append((name, store))
    return stores


def format_size(size: float) -> str:
    """1536 -> '1.5 KiB': binary units, as in cache.max_size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class Progress:
    """A tqdm bar on a terminal; off one (logs, CI), plain lines: those worth one, a count now and then."""

    def __init__(self, verb: str, total: int, stream: TextIO | None = None, every: int = 0) -> None:
        self.verb = verb
        self.done = 0
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.every = every  # off a terminal: a "verify: N/M" line every this many quiet steps (0: never)
        self.bar = tqdm(
            total=total, desc=verb, file=self.stream, disable=not self.tty, unit=" crates", leave=False,
            dynamic_ncols=True, mininterval=0.2,
        )  # fmt: skip

    @property
    def total(self) -> int:
        return int(self.bar.total or 0)

    @total.setter
    def total(self, value: int) -> None:
        self.bar.total = value
        self.bar.refresh()

    def step(self, label: str, line: str | None = None) -> None:
        """One item done. `line` is worth a line of its own off a terminal; `label` names the item."""
        self.advance(1, label, line)

    def advance(self, count: int, label: str = "", line: str | None = None) -> None:
        self.done += count
        if self.tty:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(count)
        elif line is not None:
            self._print(f"{self.verb}: [{self.done}/{self.total}] {line}")
        elif self.every and self.done // self.every > (self.done - count) // self.every:
            self._print(f"{self.verb}: {self.done}/{self.total}")

    def note(self, line: str) -> None:
        """Something that must stay visible (a failure): printed as a line even on a terminal."""
        if self.tty:
            self.bar.write(f"{self.verb}: {line}", file=self.stream)
        else:
            self._print(f"{self.verb}: {line}")

    def finish(self) -> None:
        self.bar.close()

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def plural(count: int, word: str, many: str | None = None) -> str:
    return f"{count} {word if count == 1 else many or word + 's'}"


def error(message: str) -> int:
    """A one-line runtime failure on stderr; exit 1."""
    print(f"cratemirror: {message}", file=sys.stderr)
    return EXIT_FAILURE


class ToolFailure(Exception):
    """A runtime failure the tool reports as one line on stderr (exit 1)."""


@dataclass(frozen=True, slots=True)
class Backend:
    """storage.backend as the tools see it, chosen once (`backend_of`): how reports name what is
    stored, and what a tool may do there. The work itself goes through the ArtifactStore seam."""

    bucket: bool  # s3: the bucket every replica shares; else the cache dir
    thing: str  # a stored crate is a "file" or an "object"
    stored_in: str  # "cached" | "in the bucket"
    from_place: str  # appended to "removed N crates"
    owns_strays: bool  # a cache dir is the mirror's own; a bucket prefix may hold others' objects
    bounded: bool  # cache.max_size bounds it (a bucket has no bound of its own)
    unrecorded: str  # what a crate without a (trusted) record is called
    unrecorded_detail: str

    def read_limit(self, config: Config) -> int:
        """How much of one stored crate a tool reads: a bucket's objects are held to
        upstream.max_crate_size (anyone with write access may have put them there); a cache dir's
        files are the mirror's own, kept even if the cap was lowered since they were stored."""
        return config.upstream.max_crate_size if self.bucket else UNCAPPED


UNCAPPED = 2**63 - 1
LOCAL = Backend(
    False, "file", "cached", "", owns_strays=True, bounded=True,
    unrecorded="orphaned", unrecorded_detail="no checksum recorded for this file",
)  # fmt: skip
# A bucket object's own metadata is trusted only if it authenticates with storage.s3.integrity_key.
BUCKET = Backend(
    True, "object", "in the bucket", " from the bucket", owns_strays=False, bounded=False,
    unrecorded="unauthenticated",
    unrecorded_detail="no sha256 recorded with the object that authenticates with storage.s3.integrity_key",
)  # fmt: skip


def backend_of(config: Config) -> Backend:
    return BUCKET if config.storage.backend == "s3" else LOCAL


@dataclass(frozen=True, slots=True)
class Opened:
    """One registry's store, opened for a tool."""

    name: str  # "" for crates.io, else the extra registry's name
    store: ArtifactStore
    local: Store | None  # its cache dir, if this host has one (where the upstream's dl config is kept)

    @property
    def verb_suffix(self) -> str:
        return f" [{self.name}]" if self.name else ""


@contextlib.asynccontextmanager
async def open_stores(config: Config, create: bool = False) -> AsyncIterator[list[Opened]]:
    """crates.io's store first, then each extra registry's, on the configured backend; closed after.
    `create`: make missing cache dirs (import); otherwise a missing cache dir is a config error and
    an extra registry without a cache has nothing to work on. In the bucket every registry has its
    part (registries/NAME/); the cache dir there only keeps the upstream's dl config."""
    async with contextlib.AsyncExitStack() as stack:
        opened: list[Opened] = []
        if backend_of(config).bucket:
            from cratemirror.fleet.storage import make_bucket_store

            local = _local_store(config.cache.dir, create)
            if local is not None:
                stack.callback(local.close)
            for name in [DEFAULT_REGISTRY, *config.registries]:
                shared = make_bucket_store(config.storage, config.upstream.max_index_size, registry=name)
                await shared.start()
                stack.push_async_callback(shared.close)
                main = name == DEFAULT_REGISTRY
                opened.append(Opened("" if main else name, shared, local if main else None))
        else:
            store = _local_store(config.cache.dir, create) if create else open_existing_store(config)
            assert store is not None
            stack.callback(store.close)
            opened.append(Opened("", DiskArtifacts(store), store))
            for name, extra in extra_stores(config, create):
                stack.callback(extra.close)
                opened.append(Opened(name, DiskArtifacts(extra), extra))
        yield opened


def _local_store(directory: Path, create: bool) -> Store | None:
    if not create and not (directory / "meta").is_dir():
        return None
    try:
        return Store(directory)
    except OSError as exc:
        raise ToolFailure(f"cannot open the cache dir {directory}: {exc.strerror or exc}") from None


def run_tool(config: Config, work: Coroutine[Any, Any, int]) -> int:
    """Run a tool's work; a failure (a store that fails or refuses) is one line on stderr, exit 1."""
    failures: tuple[type[Exception], ...] = (ToolFailure,)
    if backend_of(config).bucket:
        from botocore.exceptions import BotoCoreError, ClientError

        failures = (ToolFailure, BotoCoreError, ClientError)
    try:
        return asyncio.run(work)
    except failures as exc:
        return error(str(exc) if isinstance(exc, ToolFailure) else bucket_failure(exc))


def bucket_failure(exc: Exception) -> str:
    """An S3 client error as one line."""
    return f"storage.s3: {' '.join(str(exc).split())[:300]}"
