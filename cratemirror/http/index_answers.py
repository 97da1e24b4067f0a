"""Prepared answers for warm index hits: the body, validators and headers of each hot index file (and,
with a policy that enforces, the policy's view of it), made once when the entry changes and reused by
every hit while the entry is fresh.

Bounded by `cache.memory_size` per worker (least recently used out first); the bodies are the same bytes
objects the index service keeps, so a prepared answer adds only its headers (and a gzipped body once a
client asked for one). An answer is dropped when the index service takes a new entry for its key or drops
them all (`cratemirror refresh`), and is not used past the entry's freshness; with a policy that
enforces, its view is made again at least every POLICY_RECHECK_SECONDS, so a changed advisory database
or a newly learned licence shows as soon as it would without prepared answers.

Keyed by (registry, index path) where the index path is the one a validated crate name gives: a request
path that finds an answer equals such a path, so a hit needs no parsing; any other path is parsed and
validated as before.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from cachetools import LRUCache
from multidict import CIMultiDict

from cratemirror.cache.delivery import CacheResult
from cratemirror.cache.index import GZIP_MIN, IndexService
from cratemirror.fleet.storage.disk import IndexEntry
from cratemirror.names import index_path

POLICY_RECHECK_SECONDS = 1.0
_OVERHEAD = 512  # headers and bookkeeping, roughly


@dataclass(slots=True)
class Answer:
    shown: IndexEntry  # what clients see: the stored entry, or the policy's view of it
    headers: CIMultiDict[str]  # identity body, X-Cache: HIT
    gzip_headers: CIMultiDict[str] | None  # None: too small to be worth gzip
    gzipped: bytes | None  # made the first time a client accepts gzip
    valid_until: float  # wall clock: the entry's freshness, or the policy recheck
    policy_changes: int  # the policy's change count when the view was made
    wire: Wire | None = None  # the identity answer's bytes, made when the hit lane first sends it
    gzip_wire: Wire | None = None

    def size(self) -> int:
        return len(self.shown.body) + len(self.gzipped or b"") + _OVERHEAD  # a Wire shares the bodies

    def wire_for(self, gzip: bool) -> Wire | None:
        """The ready bytes of the identity or gzip answer (None: the gzipped body is not made yet)."""
        if not gzip:
            if self.wire is None:
                self.wire = Wire(self.headers, self.shown.body)
            return self.wire
        if self.gzipped is None or self.gzip_headers is None:
            return None
        if self.gzip_wire is None:
            self.gzip_wire = Wire(self.gzip_headers, self.gzipped)
        return self.gzip_wire


class Wire:
    """An answer as the hit lane sends it: the status line and headers but Date as bytes, the body, and
    the headers as aiohttp would have sent them (for the access log)."""

    __slots__ = ("body", "head", "headers")

    def __init__(self, headers: CIMultiDict[str], body: bytes) -> None:
        self.headers = headers.copy()
        self.headers["Content-Length"] = str(len(body))
        self.headers["Server"] = SERVER_SOFTWARE
        lines = ["HTTP/1.1 200 OK\r\n", *(f"{name}: {value}\r\n" for name, value in self.headers.items())]
        self.head = "".join(lines).encode("latin-1")
        self.body = body


def make_answer(shown: IndexEntry, fresh_until: float, policy_changes: int) -> Answer:
    headers = CIMultiDict(
        {
            "Content-Type": "text/plain",
            "ETag": shown.etag,
            "Last-Modified": shown.last_modified,
            "Vary": "Accept-Encoding",
            "X-Cache": CacheResult.HIT,
        }
    )
    gzip_headers = None
    if len(shown.body) >= GZIP_MIN:
        gzip_headers = headers.copy()
        # The same bytes once decoded, but another representation.
        gzip_headers["ETag"] = f"W/{shown.etag}"
        gzip_headers["Content-Encoding"] = "gzip"
    return Answer(shown, headers, gzip_headers, None, fresh_until, policy_changes)


class IndexAnswers:
    """One per worker, shared by the registries (keys carry the registry's name)."""

    def __init__(self, budget: int) -> None:
        self._answers: LRUCache[tuple[str, str], Answer] = LRUCache(budget, getsizeof=Answer.size)

    def watch(self, registry: str, index: IndexService) -> None:
        """Drop a registry's answers as its index service's entries change."""

        def changed(lower: str | None) -> None:
            if lower is None:
                self._answers.clear()  # rare (a refresh): the other registries' answers come back cheaply
            else:
                self._answers.pop((registry, index_path(lower)), None)

        index.on_change(changed)

    def get(self, registry: str, path: str, policy_changes: int) -> Answer | None:
        answer = self._answers.get((registry, path))
        if answer is not None and (
            answer.policy_changes != policy_changes or time.time() >= answer.valid_until
        ):
            return None
        return answer

    def put(self, registry: str, path: str, answer: Answer) -> None:
        with contextlib.suppress(ValueError):  # larger than the whole budget: not kept
            self._answers[(registry, path)] = answer

    def resized(self, registry: str, path: str, answer: Answer) -> None:
        """Account for the gzipped body an answer gained (if it is still held)."""
        if self._answers.get((registry, path)) is answer:
            self.put(registry, path, answer)


def fresh_until(entry: IndexEntry, index: IndexService, policy_rechecks: bool) -> float:
    """Until when an answer made from `entry` may be used (wall clock)."""
    until = entry.checked_at + index.cache.index_ttl
    if policy_rechecks:
        until = min(until, time.time() + POLICY_RECHECK_SECONDS)
    return until


def wants_gzip(request: web.Request, answer: Answer) -> bool:
    return answer.gzip_headers is not None and "gzip" in request.headers.get("Accept-Encoding", "")


def headers_for(answer: Answer, gzip: bool, x_cache: str) -> CIMultiDict[str]:
    """A copy of the answer's headers (aiohttp adds to a response's headers)."""
    headers = (answer.gzip_headers if gzip and answer.gzip_headers is not None else answer.headers).copy()
    if x_cache != CacheResult.HIT:
        headers["X-Cache"] = x_cache
    return headers
