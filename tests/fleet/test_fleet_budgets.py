"""Issue 18, finding 4, across replicas: with coordination.redis_url, a client's unknown-name budget and
the once-a-second refresh of a name hold for the whole fleet (a real redis-server, two replicas), not
once per replica."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from cratemirror.cache.ratelimit import BURST, PER_SECOND
from tests.fake_upstream import FakeRegistry, index_path
from tests.fleet_support import MotoS3, RedisServer, replicas

LOOKUPS = BURST + 60


async def _status(session: aiohttp.ClientSession, method: str, url: str) -> int:
    async with session.request(method, url) as response:
        await response.read()
        return response.status


async def test_the_budget_holds_across_replicas(
    registry: FakeRegistry, tmp_path: Path, redis_server: RedisServer
) -> None:
    registry.add_crate("serde", "1.0.0")
    registry.delay = 0.2  # lookups overlap
    text = f"coordination:\n  redis_url: {redis_server.url}\n"
    async with (
        replicas(registry.index_url, tmp_path, 2, config_text=text) as (first, second),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        started = time.monotonic()
        urls = [
            f"{(first, second)[n % 2].url}/index/{index_path(f'none{n}')}" for n in range(LOOKUPS)
        ]  # fmt: skip
        statuses = await asyncio.gather(*(_status(session, "GET", url) for url in urls))
        elapsed = time.monotonic() - started
        lookups = registry.count("/none")
        assert lookups <= BURST + PER_SECOND * elapsed + 2, (lookups, elapsed)
        assert statuses.count(404) == lookups and statuses.count(429) == LOOKUPS - lookups > 0
        registry.delay = 0
        path = "/" + index_path("serde")
        assert await _status(session, "GET", f"{second.url}/index{path}") == 200  # exists: never refused


async def test_refresh_reaches_upstream_once_a_second_for_the_fleet(
    registry: FakeRegistry, tmp_path: Path, redis_server: RedisServer, moto: MotoS3
) -> None:
    """Replicas with their own cache dirs sharing a bucket: the one that refreshes brings the copy
    every other replica answers with."""
    registry.add_crate("serde", "1.0.0")
    text = moto.yaml() + f"coordination:\n  redis_url: {redis_server.url}\n"
    async with (
        replicas(registry.index_url, tmp_path, 2, config_text=text) as (first, second),
        aiohttp.ClientSession() as session,
    ):
        path = "/" + index_path("serde")
        assert await _status(session, "GET", f"{first.url}/index{path}") == 200
        before = registry.count(path)
        started = time.monotonic()
        refreshes = [f"{(first, second)[n % 2].url}/-/refresh/serde" for n in range(20)]
        for url in refreshes:
            assert await _status(session, "POST", url) == 200
        elapsed = time.monotonic() - started
        assert 1 <= registry.count(path) - before <= 1 + int(elapsed), elapsed
        assert await _status(session, "GET", f"{second.url}/index{path}") == 200
