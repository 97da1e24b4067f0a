"""What the operator commands share: config loading, opening the cache, progress output, sizes."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import TextIO

from cratemirror.config import Config, ConfigError, find_config_path, load_config
from cratemirror.logs import setup_logging
from cratemirror.store import CrateMeta, Store

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
    setup_logging(config.logging)
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
    from cratemirror.registry import registry_cache_dir

    stores = []
    for name in config.registries:
        directory = registry_cache_dir(config.cache.dir, name)
        if (directory / "meta").is_dir():
            stores.append((name, Store(directory)))
    return stores


def cached_crate_metas(store: Store) -> list[CrateMeta]:
    """Every crate the store has a checksum for (file present or not)."""
    return list(store.iter_crate_metas())


def format_size(size: float) -> str:
    """1536 -> '1.5 KiB': binary units, as in cache.max_size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class Progress:
    """A progress bar redrawn in place on a terminal; plain lines (for logs and CI) otherwise."""

    def __init__(self, verb: str, total: int, stream: TextIO | None = None, every: int = 0) -> None:
        self.verb = verb
        self.total = total
        self.done = 0
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.every = every  # off a terminal: a "checked N/M" line every this many quiet steps (0: never)
        self._drawn = False

    def step(self, label: str, line: str | None = None) -> None:
        """One item done. `line` is worth a line of its own off a terminal; `label` names the item."""
        self.done += 1
        if self.tty:
            self._draw(label)
        elif line is not None:
            self._print(f"{self.verb}: [{self.done}/{self.total}] {line}")
        elif self.every and self.done % self.every == 0:
            self._print(f"{self.verb}: {self.done}/{self.total}")

    def note(self, line: str) -> None:
        """Something that must stay visible (a failure): printed as a line even on a terminal."""
        if self.tty:
            self._clear()
        self._print(f"{self.verb}: {line}")

    def finish(self) -> None:
        if self.tty:
            self._clear()

    def _draw(self, label: str) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        counter = f" {self.done}/{self.total} "
        bar_width = max(10, min(40, width // 3))
        filled = bar_width * self.done // max(self.total, 1)
        text = f"{self.verb} [{'#' * filled}{'.' * (bar_width - filled)}]{counter}{label}"
        self.stream.write("\r" + text[: width - 1] + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def plural(count: int, word: str, many: str | None = None) -> str:
    return f"{count} {word if count == 1 else many or word + 's'}"


def error(message: str) -> int:
    """A one-line runtime failure on stderr; exit 1."""
    print(f"cratemirror: {message}", file=sys.stderr)
    return EXIT_FAILURE
