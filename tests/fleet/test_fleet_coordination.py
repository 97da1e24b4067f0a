"""Coordination across replicas through a real redis-server: one upstream fetch per key for the whole
fleet, shared negative entries, and a Redis that dies mid-run costing no request (degraded, then back)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from cratemirror.fleet.coordination import Coordination, make_coordination
from cratemirror.fleet.storage.disk import Store
from cratemirror.metrics import Metrics
from tests.fake_upstream import FakeRegistry, index_path
from tests.fleet_support import RedisServer, replicas
from tests.mirror_process import MirrorProcess, metric_value, wait_until

CLIENTS = 60


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        yield client


def coordinated(
    registry: FakeRegistry,
    tmp_path: Path,
    redis_url: str,
    count: int = 3,
    *,
    shared_cache: bool,
    workers: int = 1,
) -> AbstractAsyncContextManager[list[MirrorProcess]]:
    """`count` replicas coordinated through `redis_url`. shared_cache: one cache dir for all (the
    storage every replica sees), else one each."""
    text = f"coordination:\n  redis_url: {redis_url}\ncache:\n  negative_ttl: 60s\n"
    return replicas(
        registry.index_url, tmp_path, count, config_text=text, workers=workers, shared_cache=shared_cache
    )


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


async def lock_calls(url: str) -> int:
    """How many times Redis was asked for a lock (SET ... NX) so far."""
    client = Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_set", {}).get("calls", 0))


async def test_sixty_requests_over_three_replicas_make_one_upstream_download(
    registry: FakeRegistry, redis_server: RedisServer, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    cv = registry.add_crate("serde", "1.0.0")
    registry.gate = gate = asyncio.Event()
    # Two worker processes each: the flock queues a replica's workers, Redis the replicas.
    async with coordinated(registry, tmp_path, redis_server.url, shared_cache=True, workers=2) as mirrors:
        urls = itertools.cycle(f"{m.url}/api/v1/crates/serde/1.0.0/download" for m in mirrors)
        tasks = [asyncio.create_task(get(session, next(urls))) for _ in range(CLIENTS)]
        try:
            await asyncio.wait_for(registry.hold_started.wait(), timeout=30)
            assert registry.held == 1
        finally:
            gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        assert [(status, body == cv.data) for status, body in results] == [(200, True)] * CLIENTS
        assert registry.count("/crates/serde/1.0.0/download") == 1, dict(registry.requests)
        assert registry.count("/index/se/rd/serde") == 1, dict(registry.requests)
        assert await lock_calls(redis_server.url) >= 2  # the index file's lock and the crate's
        for mirror in mirrors:
            async with session.get(f"{mirror.url}/metrics") as response:
                assert metric_value(await response.text(), "cratemirror_coordination_up") == 1


async def test_a_replica_knows_what_another_learnt_is_missing(
    registry: FakeRegistry, redis_server: RedisServer, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with coordinated(registry, tmp_path, redis_server.url, count=2, shared_cache=False) as (a, b):
        assert (await get(session, f"{a.url}/index/3/n/nop"))[0] == 404
        assert registry.count("/index/3/n/nop") == 1
        # b has its own cache: only Redis can tell it that upstream has no such crate.
        assert (await get(session, f"{b.url}/index/3/n/nop"))[0] == 404
        assert registry.count("/index/3/n/nop") == 1, dict(registry.requests)


async def test_redis_killed_mid_run_costs_no_request_and_comes_back(
    registry: FakeRegistry, redis_server: RedisServer, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    versions = [registry.add_crate("serde", f"1.0.{n}") for n in range(4)]
    registry.gate = gate = asyncio.Event()
    async with coordinated(registry, tmp_path, redis_server.url, shared_cache=True) as mirrors:
        first = versions[0]
        tasks = [
            asyncio.create_task(get(session, f"{m.url}/api/v1/crates/serde/{first.vers}/download"))
            for m in mirrors
            for _ in range(5)
        ]
        try:
            await asyncio.wait_for(registry.hold_started.wait(), timeout=30)
            await redis_server.kill()  # while a fill holds the Redis lock and others wait on it
        finally:
            gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        assert [(status, body == first.data) for status, body in results] == [(200, True)] * len(tasks)

        # Without Redis: every replica still serves, each coalescing its own requests.
        for mirror, cv in zip(mirrors, versions[1:], strict=True):
            assert await get(session, f"{mirror.url}/api/v1/crates/serde/{cv.vers}/download") == (
                200,
                cv.data,
            )
        for mirror in mirrors:
            status, body = await get(session, f"{mirror.url}/readyz")
            assert status == 200 and b"degraded" in body, body
            async with session.get(f"{mirror.url}/metrics") as response:
                assert metric_value(await response.text(), "cratemirror_coordination_up") == 0

        # Redis back on the same address: the replicas notice by themselves (readiness checks ping it).
        await redis_server.start(redis_server.port)
        for mirror in mirrors:

            async def recovered(mirror: MirrorProcess = mirror) -> bool:
                return await get(session, f"{mirror.url}/readyz") == (200, b"ready\n")

            await wait_until(recovered, f"{mirror.url} to use Redis again", timeout=15, interval=0.1)
            async with session.get(f"{mirror.url}/metrics") as response:
                assert metric_value(await response.text(), "cratemirror_coordination_up") == 1


async def test_the_redis_lock_excludes_across_separate_stores(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two replicas' coordinations, each over its own cache dir (so their flocks never meet): only the
    Redis lock keeps their holders apart."""
    coordinations = [
        make_coordination(redis_server.url, Store(tmp_path / f"cache{n}"), Metrics()) for n in range(2)
    ]
    holders = 0
    most = 0
    entered = 0

    async def hold(n: int) -> None:
        nonlocal holders, most, entered
        async with coordinations[n % 2].lock("crate:serde/1.0.0"):
            holders += 1
            entered += 1
            most = max(most, holders)
            await asyncio.sleep(0.01)  # a fill's work, in which any overlap would show
            holders -= 1

    try:
        await asyncio.wait_for(asyncio.gather(*(hold(n) for n in range(10))), timeout=30)
    finally:
        for coordination in coordinations:
            with contextlib.suppress(Exception):
                await coordination.close()
    assert (entered, most) == (10, 1)


async def test_a_replica_hears_that_the_upstream_is_down(
    registry: FakeRegistry, redis_server: RedisServer, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    registry.add_crate("serde", "1.0.0")
    async with coordinated(registry, tmp_path, redis_server.url, count=2, shared_cache=False) as (a, b):

        async def upstream_up(mirror: MirrorProcess) -> float:
            async with session.get(f"{mirror.url}/metrics") as response:
                return metric_value(await response.text(), "cratemirror_upstream_up")

        registry.down = True
        for name in ("serde", "rand", "tokio", "syn"):  # A alone finds the upstream failing
            status, _ = await get(session, f"{a.url}/index/{index_path(name)}")
            assert status >= 500
        assert await upstream_up(a) == 0

        async def b_heard() -> bool:
            return await upstream_up(b) == 0

        await wait_until(b_heard, "replica B to take A's word that the upstream is down", timeout=10)
        registry.down = False

        async def b_serves() -> bool:  # its own probe finds the upstream back
            return (await get(session, f"{b.url}/index/se/rd/serde"))[0] == 200

        await wait_until(b_serves, "replica B to find the upstream back", timeout=15, interval=0.2)
        assert await upstream_up(b) == 1
        # ... and stays up: A (idle, still down in its own view) keeps its note in Redis for a while,
        # but B has seen the upstream answer since. Watched over several of B's looks at Redis.
        for _ in range(10):
            await asyncio.sleep(0.3)
            assert (await get(session, f"{b.url}/index/se/rd/serde"))[0] == 200
            assert await upstream_up(b) == 1


async def test_registries_never_share_a_lock(redis_server: RedisServer, tmp_path: Path) -> None:
    """The same crate name in two registries is two keys: holding one never blocks the other."""
    store = Store(tmp_path / "cache")
    crates_io = make_coordination(redis_server.url, store, Metrics())
    internal = make_coordination(
        redis_server.url, Store(tmp_path / "internal"), Metrics(), namespace="internal"
    )
    try:
        async with crates_io.lock("crate:serde/1.0.0"):
            await asyncio.wait_for(_hold_briefly(internal), timeout=5)
    finally:
        await crates_io.close()
        await internal.close()


async def _hold_briefly(coordination: Coordination) -> None:
    async with coordination.lock("crate:serde/1.0.0"):
        pass
