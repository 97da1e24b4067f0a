"""`cratemirror warm`: prefetch every crates.io crate a Cargo.lock needs, with its index file.

Two ways in: `--mirror URL` asks a running mirror (which fetches and verifies as for any client);
otherwise the cache dir from the config is filled directly, by the same services the server runs
(IndexService, CrateService), so fetching, verification and storage are exactly the server's.
Either way each crate is also checked against the checksum the lockfile recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import sys
from collections.abc import Sequence
from typing import Protocol

from cratemirror.cache.delivery import Blocked, CacheResult, Failed, FromFile, FromFill, HeadersOnly, Redirect
from cratemirror.cache.index import find_version
from cratemirror.config.schema import Config, ConfigError
from cratemirror.http.app import create_app
from cratemirror.http.context import MIRROR
from cratemirror.names import DEFAULT_REGISTRY, CrateName, parse_crate_version
from cratemirror.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    MirrorClient,
    Progress,
    ServerApp,
    answer_reason,
    body_sha256,
    error,
    plural,
    tool_config,
)
from cratemirror.tools.lockfile import (
    CRATES_IO_SOURCES,
    LockedCrate,
    LockedSet,
    accepted_sources,
    read_lockfiles,
    registry_sources,
)

FETCHED = "fetched"
CACHED = "already cached"
DEFAULT_JOBS = 8
WARM_CLIENT = "cratemirror-warm"  # who asked, in the policy's log and the audit trail


class WarmFailure(Exception):
    """One crate could not be warmed; str() is the one-line reason."""


class Warmer(Protocol):
    async def warm(self, crate: LockedCrate) -> str:
        """FETCHED or CACHED, or raises."""


def check_lockfile(crate: LockedCrate, cksum: str) -> None:
    """The registry's index must agree with the lockfile, or cargo would refuse the bytes anyway."""
    if crate.checksum is not None and crate.checksum != cksum:
        raise WarmFailure(
            f"the lockfile's checksum {crate.checksum} differs from the registry index cksum {cksum}"
        )


class DirectWarmer(ServerApp):
    """Fills the cache dir itself with the server's own services, wired by create_app (as `serve` does)."""

    def __init__(self, config: Config) -> None:
        # warm fetches exactly what the lockfile names: no guessing what cargo would pick
        upstream = config.upstream.model_copy(update={"prefetch": "off"})
        self.config = config = config.model_copy(update={"upstream": upstream})
        app = create_app(config)
        super().__init__(app)
        self.mirror = app[MIRROR]
        self.registry = self.mirror.registries[DEFAULT_REGISTRY]

    def for_registry(self, name: str) -> DirectWarmer:
        """The same started app, warming the crates of another configured registry."""
        view = copy.copy(self)
        view.registry = self.mirror.registries[name]
        return view

    async def warm(self, crate: LockedCrate) -> str:
        """The server's own download decision (policy included), as a client named "warm" would get it."""
        crates, store = self.registry.crates, self.registry.store
        wanted = parse_crate_version(crate.name, crate.version)
        record = await crates.resolve(wanted)  # caches the index file too: cargo will ask for it
        check_lockfile(crate, record.cksum)
        match await crates.deliver(wanted, head=False, client=WARM_CLIENT):
            case FromFile(file=file):
                file.close()
                return CACHED
            case Redirect():  # in the shared storage already
                return CACHED
            case FromFill(body=body, release=release):
                try:
                    await body.finished  # verified against the index cksum, fsynced and stored (or raised)
                finally:
                    release()
            case Blocked(rule=rule, reason=reason):
                raise WarmFailure(f"blocked by the policy ({rule}): {reason}")
            case Failed(reason=reason):
                raise WarmFailure(reason)
            case HeadersOnly():
                raise AssertionError("a GET is never answered with headers only")
        if store.get_crate_meta(record.name, wanted.version) is None:
            raise WarmFailure("downloaded and verified, but it could not be stored (see the log above)")
        return FETCHED


class MirrorWarmer(MirrorClient):
    """Asks a running mirror, like cargo would: the index file, then the download."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url, "cratemirror-warm", sock_read=120)
        self._index_files: dict[str, asyncio.Task[bytes]] = {}

    async def warm(self, crate: LockedCrate) -> str:
        wanted = parse_crate_version(crate.name, crate.version)
        record = find_version(await self._index_file(wanted.crate), wanted.crate, wanted.version)
        if record is None:
            raise WarmFailure(f"the mirror's index file has no version {wanted.version}")
        check_lockfile(crate, record.cksum)
        url = f"{self.base}/api/v1/crates/{record.name}/{wanted.version}/download"
        # HEAD first: a cached crate's ETag is its sha256, so nothing needs to be transferred.
        async with self.session.head(url) as response:
            if (
                response.headers.get("X-Cache") == CacheResult.HIT
                and response.headers.get("ETag") == f'"{record.cksum}"'
            ):
                return CACHED
        async with self.session.get(url) as response:
            if response.status != 200:
                raise WarmFailure(f"the mirror answered {response.status}: {await answer_reason(response)}")
            digest = await body_sha256(response)
            if digest != record.cksum:
                raise WarmFailure(f"the mirror sent bytes hashing to {digest}, not {record.cksum}")
            return CACHED if response.headers.get("X-Cache") == CacheResult.HIT else FETCHED

    def _index_file(self, crate: CrateName) -> asyncio.Task[bytes]:
        """One request per index file, however many versions of the crate the lockfiles hold."""
        task = self._index_files.get(crate.lower)
        if task is None:
            task = asyncio.ensure_future(self._get_index_file(crate))
            self._index_files[crate.lower] = task
        return task

    async def _get_index_file(self, crate: CrateName) -> bytes:
        async with self.session.get(f"{self.base}/index/{crate.index_path}") as response:
            if response.status == 404:
                raise WarmFailure(f"the mirror does not know crate {crate.name!r} (404)")
            if response.status != 200:
                raise WarmFailure(
                    f"the mirror answered {response.status} for index/{crate.index_path}: "
                    f"{await answer_reason(response)}"
                )
            return await response.read()


async def warm_all(warmer: Warmer, crates: Sequence[LockedCrate], jobs: int) -> collections.Counter[str]:
    """Warm every crate, at most `jobs` at a time; counts by outcome (FETCHED, CACHED, "failed")."""
    semaphore = asyncio.BoundedSemaphore(jobs)
    counts: collections.Counter[str] = collections.Counter()
    progress = Progress("warm", len(crates))

    async def one(crate: LockedCrate) -> None:
        label = f"{crate.name} {crate.version}"
        async with semaphore:
            try:
                outcome = await warmer.warm(crate)
            except Exception as exc:  # one crate's failure is reported, the others go on
                counts["failed"] += 1
                progress.note(f"FAILED {label}: {str(exc) or type(exc).__name__}")
                progress.step(label)
                return
        counts[outcome] += 1
        progress.step(label, f"{outcome} {label}")

    await asyncio.gather(*(one(crate) for crate in crates))
    progress.finish()
    return counts


def summary(locked: LockedSet, counts: collections.Counter[str]) -> str:
    failed = counts["failed"] + len(locked.conflicts)
    return (
        f"warm: {plural(len(locked.crates), 'crate')}: {counts[FETCHED]} fetched, "
        f"{counts[CACHED]} already cached, {failed} failed; {locked.skipped_text()}"
    )


def mirror_base(text: str) -> str:
    """The mirror's base URL (what `client-config --url` takes); a pasted .../index/ is forgiven."""
    if not text.startswith(("http://", "https://")):
        raise ConfigError(f"--mirror: expected an http(s) URL like http://127.0.0.1:8080, got {text!r}")
    base = text.removeprefix("sparse+").rstrip("/")
    return base.removesuffix("/index")


async def _run(
    warmer: DirectWarmer | MirrorWarmer, locked: LockedSet, jobs: int, extras: dict[str, LockedSet]
) -> tuple[collections.Counter[str], dict[str, collections.Counter[str]]]:
    async with warmer:
        counts = await warm_all(warmer, locked.crates, jobs)
        extra_counts = {}
        for name, extra in extras.items():
            assert isinstance(warmer, DirectWarmer)
            extra_counts[name] = await warm_all(warmer.for_registry(name), extra.crates, jobs)
        return counts, extra_counts


def run_warm(args: argparse.Namespace) -> int:
    warmer: DirectWarmer | MirrorWarmer
    extras: dict[str, LockedSet] = {}  # the packages of each extra registry (direct mode)
    if args.mirror is not None:
        base = mirror_base(args.mirror)
        locked = read_lockfiles(args.lockfiles, CRATES_IO_SOURCES)
        warmer = MirrorWarmer(base)
    else:
        config = tool_config(args)
        locked = read_lockfiles(args.lockfiles, accepted_sources([config.upstream.index_url]))
        for name, registry in config.registries.items():
            extra = read_lockfiles(args.lockfiles, registry_sources(registry.index_url))
            if extra.crates or extra.conflicts:
                extras[name] = extra
                # Not "skipped" any more: they are warmed through their own registry.
                locked.skipped["other registry"] -= len(extra.crates)
                locked.skipped = +locked.skipped  # drops a count that fell to 0
                extra.skipped.clear()  # what it skips is counted on the crates.io line
        try:
            warmer = DirectWarmer(config)
        except OSError as exc:
            return error(f"cannot open the cache dir {config.cache.dir}: {exc.strerror or exc}")
    for conflict in [*locked.conflicts, *(c for extra in extras.values() for c in extra.conflicts)]:
        print(f"warm: FAILED {conflict}", file=sys.stderr)
    try:
        counts, extra_counts = asyncio.run(_run(warmer, locked, args.jobs, extras))
    except OSError as exc:  # the cache dir itself failed (permissions, a full disk at start-up)
        return error(f"warm stopped: {exc.strerror or exc}")
    print(summary(locked, counts))
    failed = bool(counts["failed"] or locked.conflicts)
    for name, extra in extras.items():
        print(summary(extra, extra_counts[name]).replace("warm:", f"warm [{name}]:", 1))
        failed = failed or bool(extra_counts[name]["failed"] or extra.conflicts)
    return EXIT_FAILURE if failed else EXIT_OK
