"""`cargo search` through the mirror: the registry's web API answer for a query, cached a minute and
served from the cache while the API is unreachable.

Only a validated query (`q`, `per_page`) is forwarded: the mirror builds the upstream URL itself, so
nothing else a client sends reaches the API. The answer is upstream input: bounded in size, parsed, and
passed on only when it is the JSON object cargo expects (`crates` a list).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from yarl import URL

from cratemirror.cache.singleflight import SingleFlight
from cratemirror.upstream.client import Upstream, UpstreamError

SEARCH_TTL = 60.0  # an answer younger than this is served without asking the API
MAX_ENTRIES = 1024  # queries remembered per worker (least recently used dropped first)
MAX_ANSWER_BYTES = 1024 * 1024  # crates.io's answer for 100 crates is ~60 KiB
MAX_QUERY_LENGTH = 256
MAX_PER_PAGE = 100  # crates.io's own limit
DEFAULT_PER_PAGE = 10  # what crates.io answers without per_page (cargo always sends it)

SearchResult = Literal["hit", "miss", "stale"]


class BadQuery(ValueError):
    """A query the mirror does not forward; str() is the one-line reason."""


class SearchUnavailable(Exception):
    """No answer: the API failed (or the mirror is offline) and nothing is cached for the query."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class SearchQuery:
    q: str
    per_page: int

    @classmethod
    def parse(cls, q: str | None, per_page: str | None) -> SearchQuery:
        """From the request's query string; ValueError-derived BadQuery with the reason otherwise."""
        text = (q or "").strip()
        if not text:
            raise BadQuery("q: expected a search text")
        if len(text) > MAX_QUERY_LENGTH:
            raise BadQuery(f"q: expected at most {MAX_QUERY_LENGTH} characters, got {len(text)}")
        if not text.isprintable():
            raise BadQuery("q: expected printable text")
        if per_page is None:
            return cls(text, DEFAULT_PER_PAGE)
        digits = per_page.isascii() and per_page.isdigit() and len(per_page) <= 3
        if not digits or not 1 <= int(per_page) <= MAX_PER_PAGE:
            expected = f"a whole number from 1 to {MAX_PER_PAGE}"
            raise BadQuery(f"per_page: expected {expected}, got {per_page[:20]!r}")
        return cls(text, int(per_page))


@dataclass(frozen=True, slots=True)
class _Copy:
    body: bytes
    fetched_at: float


class SearchService:
    def __init__(self, upstream: Upstream, api_url: str | None, *, offline: bool = False) -> None:
        self.upstream = upstream
        self.api_url = api_url
        self.offline = offline
        self.ttl = SEARCH_TTL
        self._copies: OrderedDict[SearchQuery, _Copy] = OrderedDict()
        self._flights: SingleFlight[bytes] = SingleFlight()

    @property
    def enabled(self) -> bool:
        return self.api_url is not None

    async def search(self, query: SearchQuery) -> tuple[bytes, SearchResult]:
        """The API's JSON answer and whether it came from the cache (hit), upstream (miss) or an old
        copy while the API fails (stale). Raises SearchUnavailable when there is no answer at all."""
        held = self._copies.get(query)
        if held is not None:
            self._copies.move_to_end(query)
            if time.monotonic() - held.fetched_at < self.ttl:
                return held.body, "hit"
        if self.offline:
            if held is not None:
                return held.body, "stale"
            raise SearchUnavailable("offline, and this search is not cached", 503)
        try:
            body, _ = await self._flights.run(f"{query.q}\0{query.per_page}", lambda: self._fetch(query))
        except UpstreamError as exc:
            if held is not None:
                return held.body, "stale"
            raise SearchUnavailable(f"the registry's search failed: {exc}", exc.status) from exc
        return body, "miss"

    async def _fetch(self, query: SearchQuery) -> bytes:
        assert self.api_url is not None
        url = URL(self.api_url.rstrip("/") + "/api/v1/crates").with_query(
            {"q": query.q, "per_page": str(query.per_page)}
        )
        body = await self.upstream.fetch_api(url, MAX_ANSWER_BYTES)
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            document = None
        if not isinstance(document, dict) or not isinstance(document.get("crates"), list):
            raise UpstreamError(f"{url}: not a search answer (expected a JSON object with a crates list)")
        self._copies[query] = _Copy(body, time.monotonic())
        self._copies.move_to_end(query)
        while len(self._copies) > MAX_ENTRIES:
            self._copies.popitem(last=False)
        return body
