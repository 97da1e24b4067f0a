"""Cold misses against a slow upstream: the mirror versus going to the upstream directly.

Per key, as cargo does it: the index file, then the crate (whose index the mirror has just cached).
Each request is timed to the response headers (time to first byte) and to the last byte. The mirror
and the direct request for a key run back to back, alternating which goes first.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from bench.catalog import CrateSpec

# What cargo sends; the upstream gzips index files for it, the mirror answers identity.
HEADERS = {"Accept-Encoding": "gzip"}


@dataclass(frozen=True)
class Timing:
    ttfb: float
    total: float


async def timed_get(session: aiohttp.ClientSession, url: str) -> Timing:
    started = time.perf_counter()
    async with session.get(url, headers=HEADERS) as response:
        ttfb = time.perf_counter() - started
        await response.read()
        total = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"cold miss: {url} answered {response.status}")
        cache = response.headers.get("X-Cache")
        if cache is not None and cache != "MISS":
            raise RuntimeError(f"cold miss: {url} was not a miss (X-Cache: {cache})")
    return Timing(ttfb, total)


def median_timing(timings: Sequence[Timing]) -> Timing:
    return Timing(statistics.median(t.ttfb for t in timings), statistics.median(t.total for t in timings))


async def warm_up(mirror_url: str, spec: CrateSpec) -> None:
    """One miss before measuring, so the mirror has read the upstream's config.json (once per process
    lifetime in practice) and opened its upstream connection pool."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await timed_get(session, mirror_url + spec.index_url_path)
        await timed_get(session, mirror_url + spec.download_path)


async def cold_round(
    mirror_url: str, upstream_url: str, crates: Sequence[CrateSpec], mirror_first: bool
) -> dict[str, dict[str, Timing]]:
    """Median timings of one round: {"index"|"crate": {"cratemirror"|"direct": Timing}}."""
    samples: dict[str, dict[str, list[Timing]]] = {
        kind: {"cratemirror": [], "direct": []} for kind in ("index", "crate")
    }
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for i, spec in enumerate(crates):
            sides = ["cratemirror", "direct"]
            if (i % 2 == 0) != mirror_first:
                sides.reverse()
            urls = {
                "index": {
                    "cratemirror": mirror_url + spec.index_url_path,
                    "direct": upstream_url + spec.index_url_path,
                },
                "crate": {
                    "cratemirror": mirror_url + spec.download_path,
                    "direct": upstream_url + spec.upstream_download_path,
                },
            }
            for kind in ("index", "crate"):
                for side in sides:
                    samples[kind][side].append(await timed_get(session, urls[kind][side]))
    return {
        kind: {side: median_timing(values) for side, values in by_side.items()}
        for kind, by_side in samples.items()
    }
