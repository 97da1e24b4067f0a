"""What a service decided for one request: a value the HTTP layer turns into a response in one `match`.

Services (crates, toolchain files) decide; routes answer. Nothing here knows HTTP beyond a status code
and header names, so a tool (warm, prefetch) can take the same decision and act on it without a server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import BinaryIO, Protocol


class CacheResult(StrEnum):
    """The `X-Cache` header of an answer."""

    HIT = "HIT"
    MISS = "MISS"
    REVALIDATED = "REVALIDATED"
    STALE = "STALE"


class MetricResult(StrEnum):
    """The `result` label of cratemirror_cache_requests_total."""

    HIT = "hit"
    MISS = "miss"
    REVALIDATED = "revalidated"
    STALE = "stale"
    NEGATIVE = "negative"
    ERROR = "error"


class GrowingBody(Protocol):
    """A download in progress whose verified prefix may be sent while the rest arrives.

    `published` bytes may be sent; `finished` resolves when the whole body is verified and stored, or
    fails (the client connection must then be cut before the last byte)."""

    content_length: int | None
    published: int
    finished: asyncio.Future[None]

    def read_at(self, position: int, size: int) -> bytes: ...

    async def wait_beyond(self, position: int) -> None: ...


@dataclass(frozen=True, slots=True)
class FromFile:
    """A verified, stored file: send it (sendfile), honouring conditional requests."""

    file: BinaryIO  # opened before the decision, so a concurrent eviction cannot truncate the answer
    size: int
    headers: Mapping[str, str]  # ETag, Cache-Control, X-Cache, ...
    result: MetricResult = MetricResult.HIT


@dataclass(frozen=True, slots=True)
class FromFill:
    """Bytes streamed from a fill in progress; `release` is called once the answer is done."""

    body: GrowingBody
    headers: Mapping[str, str]
    release: Callable[[], None]
    result: MetricResult = MetricResult.MISS


@dataclass(frozen=True, slots=True)
class Redirect:
    """Send the client elsewhere (a presigned URL of the shared storage)."""

    location: str
    headers: Mapping[str, str] = field(default_factory=dict)
    result: MetricResult = MetricResult.HIT


@dataclass(frozen=True, slots=True)
class HeadersOnly:
    """A HEAD request: the headers the GET would carry, no body fetched."""

    headers: Mapping[str, str]
    result: MetricResult = MetricResult.MISS


@dataclass(frozen=True, slots=True)
class Blocked:
    """Refused by a gate (the policy): 403 with the rule and a one-line reason."""

    rule: str
    reason: str
    x_cache: CacheResult = CacheResult.MISS
    result: MetricResult = MetricResult.ERROR


@dataclass(frozen=True, slots=True)
class Failed:
    """No answer to give: the status and one plain-text line saying why."""

    status: int
    reason: str
    x_cache: CacheResult = CacheResult.MISS
    result: MetricResult = MetricResult.ERROR


Delivery = FromFile | FromFill | Redirect | HeadersOnly | Blocked | Failed
