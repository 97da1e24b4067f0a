"""`cratemirror refresh NAME...`: revalidate these index files with upstream now, whatever their age.

For a version published a moment ago (a teammate's lockfile pins it, or `cargo update --precise`).
Directly on the cache dir (every worker process notices the store's index generation change and drops
its in-memory copies), or through a running mirror with `--mirror URL` (`POST /-/refresh/<name>`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

from cratemirror import __version__
from cratemirror.config.schema import ConfigError
from cratemirror.names import CrateName, InvalidRequest, parse_name
from cratemirror.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    answer_reason,
    error,
    mirror_headers,
    tool_config,
)
from cratemirror.tools.warm import DirectWarmer, mirror_base
from cratemirror.upstream.client import UpstreamError

MAX_NAMES = 1000  # one invocation, one bounded batch: refreshing "everything" is what index_ttl is for
JOBS = 8


class RefreshFailure(Exception):
    """One name could not be refreshed; str() is the one-line reason."""


class NotFound(RefreshFailure):
    """Upstream has no such crate: a refresh that cannot have done what was asked (exit 1)."""


Outcome = str | RefreshFailure  # the line to print, or why it failed


def parse_names(texts: Sequence[str]) -> list[CrateName]:
    if len(texts) > MAX_NAMES:
        raise ConfigError(f"refresh: expected at most {MAX_NAMES} crate names, got {len(texts)}")
    crates = []
    for text in texts:
        try:
            crates.append(parse_name(text))
        except InvalidRequest as exc:
            raise ConfigError(f"refresh: {exc}") from exc
    return list({crate.lower: crate for crate in crates}.values())


def _line(crate: CrateName, found: bool) -> Outcome:
    if not found:
        return NotFound(f"{crate.name}: not found upstream")
    return f"refresh: {crate.name}: revalidated"


async def _direct(warmer: DirectWarmer, crates: list[CrateName]) -> list[Outcome]:
    async with warmer:
        index = warmer.mirror.default.index

        async def one(crate: CrateName) -> Outcome:
            try:
                result = await index.refresh(crate)
            except UpstreamError as exc:
                return RefreshFailure(f"{crate.name}: upstream error: {exc}")
            return _line(crate, result.entry.status == 200)

        return await _bounded([one(crate) for crate in crates])


async def _through_mirror(base: str, crates: list[CrateName]) -> list[Outcome]:
    headers = mirror_headers(f"cratemirror-refresh/{__version__}")
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:

        async def one(crate: CrateName) -> Outcome:
            url = f"{base}/-/refresh/{quote(crate.name, safe='')}"
            try:
                async with session.post(url) as response:
                    if response.status != 200:
                        reason = await answer_reason(response)
                        status = response.status
                        return RefreshFailure(f"{crate.name}: the mirror answered {status}: {reason}")
                    answer = await response.json()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                return RefreshFailure(f"{crate.name}: {str(exc) or type(exc).__name__}")
            return _line(crate, isinstance(answer, dict) and answer.get("found") is True)

        return await _bounded([one(crate) for crate in crates])


async def _bounded(jobs: list[Coroutine[Any, Any, Outcome]]) -> list[Outcome]:
    semaphore = asyncio.Semaphore(JOBS)

    async def limited(job: Coroutine[Any, Any, Outcome]) -> Outcome:
        async with semaphore:
            return await job

    return list(await asyncio.gather(*(limited(job) for job in jobs)))


def run_refresh(args: argparse.Namespace) -> int:
    crates = parse_names(args.names)
    if args.mirror is not None:
        outcomes = asyncio.run(_through_mirror(mirror_base(args.mirror), crates))
    else:
        config = tool_config(args)
        if config.offline:
            return error("refresh: the config says offline: upstream cannot be asked")
        try:
            outcomes = asyncio.run(_direct(DirectWarmer(config), crates))
        except OSError as exc:
            return error(f"cannot open the cache dir {config.cache.dir}: {exc.strerror or exc}")
    failed = 0
    for outcome in outcomes:
        if isinstance(outcome, RefreshFailure):
            failed += 1
            print(f"refresh: FAILED {outcome}", file=sys.stderr)
        else:
            print(outcome)
    return EXIT_FAILURE if failed else EXIT_OK
