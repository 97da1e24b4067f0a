"""What the operator commands share: config loading, opening the cache, progress output, sizes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from cratemirror.config.load import find_config_path, load_config
from cratemirror.config.schema import Config, ConfigError
from cratemirror.fleet.storage.disk import Store
from cratemirror.logsetup import setup_records
from cratemirror.metrics import DEFAULT_REGISTRY

if TYPE_CHECKING:
    from cratemirror.fleet.storage import SharedStorage

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


def mirror_headers(user_agent: str) -> dict[str, str]:
    """Headers for asking a running mirror: our User-Agent, and its token when one is in the environment."""
    headers = {"User-Agent": user_agent}
    token = os.environ.get(MIRROR_TOKEN_ENV, "").strip()
    if token:
        headers["Authorization"] = token
    return headers


def open_existing_store(config: Config) -> Store:
    """Open the cache dir for verify/prune/export: a missing one is a typo, not an empty cache."""
    if not (config.cache.dir / "meta").is_dir():
        raise ConfigError(
            f"{config.source}: cache.dir: expected an existing cache directory, got {str(config.cache.dir)!r}"
        )
    return Store(config.cache.dir)


def extra_stores(config: Config) -> list[tuple[str, Store]]:
    """(name, store) of each configured extra registry that has a cache yet (one never asked for has
    nothing to verify, prune or export)."""
    from cratemirror.cache.registry import registry_cache_dir

    stores = []
    for name in config.registries:
        directory = registry_cache_dir(config.cache.dir, name)
        if (directory / "meta").is_dir():
            stores.append((name, Store(directory)))
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


@contextlib.asynccontextmanager
async def shared_storages(config: Config) -> AsyncIterator[list[tuple[str, SharedStorage]]]:
    """(registry name, its shared storage) for storage.backend s3: crates.io's ("") first, then each
    extra registry's (registries/NAME/ in the bucket), started and closed here."""
    from cratemirror.fleet.storage import make_shared_storage

    names = [DEFAULT_REGISTRY, *config.registries]
    async with contextlib.AsyncExitStack() as stack:
        opened: list[tuple[str, SharedStorage]] = []
        for name in names:
            shared = make_shared_storage(config.storage, config.upstream.max_index_size, registry=name)
            await shared.start()
            stack.push_async_callback(shared.close)
            opened.append(("" if name == DEFAULT_REGISTRY else name, shared))
        yield opened


def uses_bucket(config: Config) -> bool:
    """storage.backend s3: the tools work on the bucket every replica shares, not on a cache dir."""
    return config.storage.backend == "s3"


def run_on_bucket(work: Coroutine[Any, Any, int]) -> int:
    """Run a tool's work on the bucket; a store that fails or refuses is one line on stderr, exit 1."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return asyncio.run(work)
    except (BotoCoreError, ClientError) as exc:
        return error(bucket_failure(exc))


def bucket_failure(exc: Exception) -> str:
    """An S3 client error as one line."""
    return f"storage.s3: {' '.join(str(exc).split())[:300]}"
