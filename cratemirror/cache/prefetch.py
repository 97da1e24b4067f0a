"""Dependency prefetch: when an index file arrives fresh from upstream, fetch the index files of the
crates its newest version depends on, before cargo asks for them.

Cargo resolves a cold tree in rounds: it reads an index file, then asks for the files of that crate's
dependencies. Each round costs the client a round trip to the mirror and the mirror one to upstream.
Fetching the next round while cargo is still reading this one takes the upstream's latency out of
every round but the first; a dependency cargo does not pick is one small index file, cached like any
other. Only what cargo is about to ask for is fetched: the normal and build dependencies (never dev)
of the newest release, optional ones only when its default features turn them on, of the same
registry. Everything here is upstream input, validated and bounded.

Bounded per client request, too: whatever one request's index file sets off (the dependencies'
files, theirs in turn) is at most MAX_PER_TRIGGER index files and MAX_DEPTH rounds deep, so a crafted
fan-out tree costs the upstream a fixed amount per request, not the whole registry.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from semantic_version import Version

from cratemirror.names import CrateName, InvalidRequest
from cratemirror.versions import CargoRequirement, RequirementError

log = logging.getLogger("cratemirror.prefetch")

TAIL_LINES = 32  # the newest version is among the last lines published
MAX_DEPENDENCIES = 64  # per index file; a real crate has far fewer
MAX_FEATURES = 256  # features followed from `default`, per index file
MAX_REQ_LENGTH = 200
MAX_VERSIONS = 4096  # lines read to pick a version for a crate prefetch
PICK_IN_THREAD = 64 * 1024
MAX_PENDING = 256  # names queued or being fetched, per worker and registry; beyond it cargo asks itself
MAX_PER_TRIGGER = 64  # index files prefetched for one client request, all rounds together
MAX_DEPTH = 4  # rounds of dependencies followed from the client's index file


PrefetchMode = Literal["off", "index", "crates"]


@dataclass
class _Trigger:
    """The client request a chain of prefetches started from: what it may still cost."""

    left: int = MAX_PER_TRIGGER


# Set in each prefetch task's own context (the request's own stays unset): its trigger and its depth.
_CHAIN: contextvars.ContextVar[tuple[_Trigger, int] | None] = contextvars.ContextVar(
    "prefetch_chain", default=None
)


@dataclass(frozen=True, slots=True)
class Dependency:
    name: CrateName  # the crate's real name (a renamed dependency's `package`)
    req: str  # the version requirement, as the index line states it


def dependencies(body: bytes) -> list[Dependency]:
    """The crates the newest non-yanked release in an index file needs with its default features:
    normal and build dependencies (never dev), optional ones only if a default feature turns them on,
    of the same registry; deduplicated, at most MAX_DEPENDENCIES. Lines that do not parse or validate
    are skipped: a prefetch never fails a request."""
    newest: tuple[Version, dict[str, object], list[object]] | None = None
    for version, _, record in _releases(body.rsplit(b"\n", TAIL_LINES)[-TAIL_LINES:]):
        deps = record.get("deps")
        if isinstance(deps, list) and not version.prerelease and (newest is None or version > newest[0]):
            newest = (version, record, deps)
    if newest is None:
        return []
    _, record, deps = newest
    enabled = _default_optional_deps(record)
    wanted: dict[str, Dependency] = {}
    for dep in deps:
        if not isinstance(dep, dict) or dep.get("registry") is not None:
            continue
        if dep.get("kind", "normal") not in ("normal", "build", None):
            continue
        if dep.get("optional") is not False and dep.get("name") not in enabled:
            continue
        package = dep.get("package") or dep.get("name")  # `package`: the real name of a renamed dependency
        req = dep.get("req")
        if not isinstance(package, str) or not isinstance(req, str) or len(req) > MAX_REQ_LENGTH:
            continue
        try:
            name = CrateName(package)
        except InvalidRequest:
            continue
        wanted.setdefault(name.lower, Dependency(name, req))
        if len(wanted) >= MAX_DEPENDENCIES:
            break
    return list(wanted.values())


def newest_matching(body: bytes, req: str, allowed: Callable[[str], bool] | None = None) -> str | None:
    """The version cargo's resolver picks for `req` from an index file on its own: the highest
    non-yanked one that matches (pre-releases only when the requirement names one). `allowed`: the
    versions the policy lets through (the others cargo sees yanked)."""
    try:
        requirement = CargoRequirement.parse(req)
    except RequirementError:
        return None
    best: tuple[Version, str] | None = None
    for version, text, _ in _releases(body.splitlines()[-MAX_VERSIONS:]):
        if (
            (best is None or version > best[0])
            and requirement.matches(version)
            and (allowed is None or allowed(text))
        ):
            best = (version, text)
    return None if best is None else best[1]


def _default_optional_deps(record: dict[str, object]) -> set[str]:
    """The dependency names (as the dependent spells them) that the `default` feature turns on,
    following cargo's feature syntax: `dep:x` and `x/feat` enable x, `x?/feat` does not, a bare name is
    a feature of this crate or an optional dependency's implicit one."""
    features: dict[str, list[object]] = {}
    for key in ("features", "features2"):
        table = record.get(key)
        if isinstance(table, dict):
            features.update((k, v) for k, v in table.items() if isinstance(k, str) and isinstance(v, list))
    enabled: set[str] = set()
    todo: list[str] = ["default"]
    seen: set[str] = set()
    while todo and len(seen) < MAX_FEATURES:
        feature = todo.pop()
        if feature in seen:
            continue
        seen.add(feature)
        for item in features.get(feature, []):
            if not isinstance(item, str) or "?/" in item:
                continue
            if item.startswith("dep:"):
                enabled.add(item[4:])
            elif "/" in item:
                enabled.add(item.split("/", 1)[0])
            elif item in features:
                todo.append(item)
            else:
                enabled.add(item)
    return enabled


def _releases(lines: Iterable[bytes]) -> Iterator[tuple[Version, str, dict[str, object]]]:
    """(version, its text, the record) of each non-yanked line whose JSON and version parse."""
    for line in lines:
        record = _parse(line)
        if record is None or record.get("yanked") is True:
            continue
        text = str(record.get("vers"))
        try:
            version = Version(text)
        except ValueError:
            continue
        yield version, text, record


def _parse(line: bytes) -> dict[str, object] | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


class Prefetcher:
    """Runs `fetch_index` (the index service's own lookup: cached names cost no upstream request, and
    a client asking meanwhile joins the same flight) for the dependencies of each fresh index file;
    in `crates` mode also `fetch_crate` for the version cargo will pick, once its index file is in."""

    def __init__(
        self,
        fetch_index: Callable[[CrateName], Awaitable[bytes | None]],
        mode: PrefetchMode,
        concurrency: int,
    ) -> None:
        """`concurrency`: index files (and, apart, crates) fetched at once; the upstream connection
        pool's size, so prefetches neither wait behind each other nor crowd out clients for long."""
        self.mode = mode
        self._fetch_index = fetch_index
        self.fetch_crate: Callable[[CrateName, bytes, str], Awaitable[None]] | None = None
        #: (name, version) -> whether the policy lets it through: a blocked version is never fetched
        self.allowed: Callable[[str, str], bool] | None = None
        self._pending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._index_slots = asyncio.Semaphore(concurrency)
        # Apart: cargo asks for the next round's index files before any crate, so they never queue
        # behind crate downloads.
        self._crate_slots = asyncio.Semaphore(concurrency)

    def after_fetch(self, crate: CrateName, body: bytes) -> None:
        """`crate`'s index file just came from upstream with `body`: prefetch what it depends on."""
        if self.mode == "off":
            return
        trigger, depth = _CHAIN.get() or (_Trigger(), 0)  # unset: a client request's own fetch
        if depth >= MAX_DEPTH:
            return
        for dependency in dependencies(body):
            name = dependency.name
            if len(self._pending) >= MAX_PENDING:
                log.debug("prefetch queue full: not prefetching the rest of %s's dependencies", crate.name)
                return
            if name.lower == crate.lower or name.lower in self._pending:
                continue
            if trigger.left <= 0:
                log.debug("prefetch budget of this request spent: not prefetching past %s", crate.name)
                return
            trigger.left -= 1
            self._pending.add(name.lower)
            # A context of its own: its upstream time is no client request's (the access log's upstream=);
            # it carries the trigger's budget and the round it is in.
            context = contextvars.Context()
            context.run(_CHAIN.set, (trigger, depth + 1))
            loop = asyncio.get_running_loop()
            task = loop.create_task(self._run(dependency), context=context)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, dependency: Dependency) -> None:
        name = dependency.name
        try:
            async with self._index_slots:
                body = await self._fetch_index(name)
            if body is None or self.mode != "crates" or self.fetch_crate is None:
                return
            policy = self.allowed
            allowed = None if policy is None else lambda version: policy(name.name, version)
            if len(body) > PICK_IN_THREAD:  # a big file's lines would hold up the event loop
                version = await asyncio.to_thread(newest_matching, body, dependency.req, allowed)
            else:
                version = newest_matching(body, dependency.req, allowed)
            if version is not None:
                async with self._crate_slots:
                    await self.fetch_crate(name, body, version)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # upstream trouble: cargo will ask itself and get a proper answer
            log.debug("prefetch of %s failed: %s", name.name, exc)
        finally:
            self._pending.discard(name.lower)

    async def drained(self) -> None:
        """Until no prefetch runs (one may start another): for tests and tools that wait for quiet."""
        for _ in range(MAX_PENDING + 1):  # each round finishes at least one task
            if not self._tasks:
                return
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
