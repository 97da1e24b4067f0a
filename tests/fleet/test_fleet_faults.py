"""A stalled dependency costs seconds, not minutes (issue 22): real mirror processes against moto's S3
server, a real redis-server and the fake upstream, with tests/faultproxy.py in between to black-hole,
delay or reset them; each test bounded in time."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.e2e.test_e2e_cargo import assert_lockfile
from tests.fake_upstream import (
    SMALL_TREE_DEPS,
    FakeRegistry,
    index_path,
    publish_small_tree,
    run_cargo,
    write_cargo_project,
)
from tests.faultproxy import FaultProxy, Mode
from tests.fleet.test_fleet_front import cargo_home, fleet
from tests.fleet_support import MotoS3, RedisServer, replicas
from tests.mirror_process import MirrorProcess, metric_value, wait_until

pytestmark = pytest.mark.fleet

S3_TIMEOUT = 1.0  # storage.s3.timeout in these tests
READYZ_PROMPT = 0.5  # /readyz answers within this, whatever a dependency does


async def fetch_crate(session: aiohttp.ClientSession, mirror: MirrorProcess, name: str) -> float:
    """Index file then .crate, as cargo asks for a cold crate; the seconds it took (both must be 200)."""
    started = time.monotonic()
    async with session.get(f"{mirror.url}/index/{index_path(name)}") as response:
        assert response.status == 200, await response.text()
    async with session.get(f"{mirror.url}/api/v1/crates/{name}/1.0.0/download") as response:
        assert response.status == 200, await response.text()
        await response.read()
    return time.monotonic() - started


async def readyz(session: aiohttp.ClientSession, mirror: MirrorProcess) -> tuple[int, str, float]:
    started = time.monotonic()
    async with session.get(f"{mirror.url}/readyz") as response:
        return response.status, await response.text(), time.monotonic() - started


async def metric(session: aiohttp.ClientSession, mirror: MirrorProcess, name: str) -> float:
    async with session.get(f"{mirror.url}/metrics") as response:
        return metric_value(await response.text(), name)


def s3_yaml(moto: MotoS3, endpoint: str) -> str:
    return moto.yaml().replace(f"endpoint_url: {moto.endpoint}", f"endpoint_url: {endpoint}") + (
        f"    timeout: {S3_TIMEOUT}s\n"
    )


async def test_a_black_holed_bucket_costs_seconds_and_is_refilled(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    names = ["alpha", "bravo", "charlie", "delta"]
    for name in names:
        registry.add_crate(name, "1.0.0")
    async with (
        FaultProxy("127.0.0.1", moto.port) as proxy,
        replicas(registry.index_url, tmp_path, 1, config_text=s3_yaml(moto, proxy.url)) as (mirror,),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        normal = await fetch_crate(session, mirror, "alpha")

        async def in_bucket(*wanted: str) -> bool:
            keys = set(await asyncio.to_thread(moto.object_keys))
            return all(f"crates/{name}/1.0.0.crate" in keys for name in wanted)

        await wait_until(lambda: in_bucket("alpha"), "alpha in the bucket", timeout=10, interval=0.05)

        # The bucket stops answering (connections accepted, nothing comes back).
        proxy.set(Mode.BLACKHOLE)
        cold = await fetch_crate(session, mirror, "bravo")
        assert cold <= 2 * normal + 3 * S3_TIMEOUT, (cold, normal)
        status, text, took = await readyz(session, mirror)
        assert status == 200 and text.startswith("degraded: ") and "shared storage" in text, text
        assert took < READYZ_PROMPT, took
        assert await metric(session, mirror, "cratemirror_storage_up") == 0
        # While degraded nothing waits on the bucket: each cold crate costs what upstream costs.
        for name in ("charlie", "delta"):
            assert await fetch_crate(session, mirror, name) <= 2 * normal + 0.5
        # Meanwhile the bucket loses an object (a store restarted empty): the hot copy will refill it.
        await asyncio.to_thread(
            moto.client().delete_object, Bucket=moto.bucket, Key="crates/alpha/1.0.0.crate"
        )

        proxy.set(Mode.PASS)
        back = time.monotonic()

        async def ready() -> bool:
            return (await readyz(session, mirror))[:2] == (200, "ready\n")

        await wait_until(ready, "readyz to say plain ready", timeout=5, interval=0.05)
        assert time.monotonic() - back <= 5
        assert await metric(session, mirror, "cratemirror_storage_up") == 1
        # What was filled while degraded, and what the bucket lost, are uploaded from the hot copy.
        await wait_until(
            lambda: in_bucket(*names), "every crate in the bucket again", timeout=15, interval=0.1
        )
        downloads = {name: registry.count(f"/crates/{name}/1.0.0/download") for name in names}
        assert downloads == dict.fromkeys(names, 1), downloads  # from the hot copy, not upstream again


async def test_a_hung_redis_never_holds_up_readyz_or_a_fill(
    registry: FakeRegistry, redis_server: RedisServer, tmp_path: Path
) -> None:
    for name in ("alpha", "bravo"):
        registry.add_crate(name, "1.0.0")
    text = f"coordination:\n  redis_url: {redis_server.url}\n  timeout: 1s\n"
    async with (
        replicas(registry.index_url, tmp_path, 1, config_text=text) as (mirror,),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        normal = await fetch_crate(session, mirror, "alpha")
        assert (await readyz(session, mirror))[:2] == (200, "ready\n")
        assert redis_server.proc is not None
        os.killpg(redis_server.proc.pid, signal.SIGSTOP)  # hung, not dead: connections just wait
        try:
            cold = await fetch_crate(session, mirror, "bravo")
            assert cold <= 2 * normal + 3.0, (cold, normal)
            # Polled for a few seconds: every answer prompt, and it turns degraded on its own.
            seen: list[str] = []
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and not (seen and seen[-1].startswith("degraded")):
                status, body, took = await readyz(session, mirror)
                assert status == 200 and took < READYZ_PROMPT, (status, body, took)
                seen.append(body)
                await asyncio.sleep(0.1)
            assert seen[-1].startswith("degraded: ") and "redis" in seen[-1], seen
            assert await metric(session, mirror, "cratemirror_coordination_up") == 0
        finally:
            os.killpg(redis_server.proc.pid, signal.SIGCONT)

        async def ready() -> bool:
            status, body, took = await readyz(session, mirror)
            assert took < READYZ_PROMPT, took
            return (status, body) == (200, "ready\n")

        await wait_until(ready, "readyz to say ready once Redis answers", timeout=5, interval=0.05)


async def test_a_hung_replica_behind_the_front_costs_cargo_seconds(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    """One replica SIGSTOP'd (hung, not dead: the kernel still accepts its connections) right before a
    cold cargo fetch through HAProxy: the checks mark it down and its requests go elsewhere."""
    publish_small_tree(registry)
    project = tmp_path / "app"
    write_cargo_project(project, SMALL_TREE_DEPS)
    async with fleet(registry, tmp_path) as f:
        started = time.monotonic()
        code, output = await run_cargo(["fetch"], project, cargo_home(tmp_path / "first", f))
        normal = time.monotonic() - started
        assert code == 0, output
        stats = await f.front.server_stats()
        number = max(range(1, 4), key=lambda n: int(stats[f"mirror{n}"]["stot"]))
        victim = f.replicas[number - 1]
        assert victim.proc is not None
        (project / "Cargo.lock").unlink()
        os.killpg(victim.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            code, output = await run_cargo(["fetch"], project, cargo_home(tmp_path / "second", f), timeout=60)
            took = time.monotonic() - started
            after = await f.front.server_stats()
        finally:
            os.killpg(victim.proc.pid, signal.SIGCONT)
        assert code == 0, f"{output}\n{f.front.output()}"
        assert took <= 5.0, (took, normal)
        assert after[f"mirror{number}"]["status"] == "DOWN", after[f"mirror{number}"]
        # It was asked (its share of the keys) and what it held was sent again to another replica.
        row = after[f"mirror{number}"]
        assert int(row["stot"]) > int(stats[f"mirror{number}"]["stot"]) or int(row["wredis"]) > 0, row
        assert_lockfile(project, registry)


async def test_upstream_recovery_is_prompt_and_shared(
    registry: FakeRegistry, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The upstream resets every connection until replica A marks it down, and B adopts that through
    Redis; when it answers again, A's next request gets through at once (half-open, no backoff to wait
    out) and B hears of the recovery through Redis without a request of its own."""
    for name in ("alpha", "bravo", "charlie", "delta"):
        registry.add_crate(name, "1.0.0")
    upstream = urlsplit(registry.url)
    assert upstream.port is not None
    async with FaultProxy("127.0.0.1", upstream.port) as proxy:
        text = f"coordination:\n  redis_url: {redis_server.url}\n"
        async with (
            replicas(f"{proxy.url}/index/", tmp_path, 2, config_text=text) as (a, b),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        ):
            await fetch_crate(session, a, "alpha")
            proxy.set(Mode.RESET)
            for name in ("bravo", "charlie"):
                async with session.get(f"{a.url}/index/{index_path(name)}") as response:
                    assert response.status == 502

            async def b_adopted_down() -> bool:
                return await metric(session, b, "cratemirror_upstream_up") == 0

            await wait_until(b_adopted_down, "B to hear through Redis that upstream is down", 10, 0.05)
            assert await metric(session, a, "cratemirror_upstream_up") == 0

            proxy.set(Mode.PASS)
            # The first request after the recovery goes through at once.
            assert await fetch_crate(session, a, "delta") < 2.0
            assert await metric(session, a, "cratemirror_upstream_up") == 1

            async def b_recovered() -> bool:
                return await metric(session, b, "cratemirror_upstream_up") == 1

            await wait_until(b_recovered, "B to hear through Redis that upstream is back", 5, 0.05)
            assert await fetch_crate(session, b, "bravo") < 2.0


async def test_every_worker_of_a_replica_says_the_same(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    """Two worker processes; the bucket stalls under a request that only one of them handles. The
    other made no call to the bucket, yet /readyz says degraded whichever worker answers it."""
    registry.add_crate("alpha", "1.0.0")
    async with (
        FaultProxy("127.0.0.1", moto.port) as proxy,
        replicas(registry.index_url, tmp_path, 1, config_text=s3_yaml(moto, proxy.url), workers=2) as (
            mirror,
        ),
        aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=60), connector=aiohttp.TCPConnector(force_close=True)
        ) as session,  # a new connection per request: the kernel spreads them over the workers
    ):
        proxy.set(Mode.BLACKHOLE)
        async with session.get(f"{mirror.url}/index/{index_path('alpha')}") as response:
            assert response.status == 200  # one request: one worker looks in the bucket

        async def degraded() -> bool:
            return (await readyz(session, mirror))[1].startswith("degraded: ")

        await wait_until(degraded, "a worker to say degraded", timeout=10, interval=0.05)
        # The other worker hears of it within a couple of its once-a-second looks: then 10 answers in a
        # row (spread over both workers by the kernel) all say so.
        await wait_until(
            lambda: all_of(degraded, 10), "the other worker to hear of it", timeout=5, interval=0.05
        )
        answers = [await readyz(session, mirror) for _ in range(20)]
        assert all(status == 200 and text.startswith("degraded: ") for status, text, _ in answers), answers


async def all_of(check: Callable[[], Awaitable[bool]], times: int) -> bool:
    for _ in range(times):
        if not await check():
            return False
    return True
