"""Replicas sharing one cache in S3 (moto's real S3 server) and coordinated through a real redis-server:
each replica has its own cache dir, so only the bucket and Redis connect them."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import signal
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from tests.e2e.test_e2e_cargo import assert_lockfile
from tests.fake_upstream import (
    SMALL_TREE_DEPS,
    SMALL_TREE_RESOLVED,
    FakeRegistry,
    publish_small_tree,
    run_cargo,
    write_cargo_home,
    write_cargo_project,
)
from tests.fleet_support import MotoS3, RedisServer, replicas
from tests.mirror_process import wait_until
from tests.tools_support import publish_sample, real_lockfile, run_cli, write_config

CLIENTS = 60


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with session.get(url) as response:
        return response.status, response.headers.get("X-Cache", ""), await response.read()


async def test_three_replicas_share_one_cache_in_s3(
    registry: FakeRegistry, redis_server: RedisServer, moto: MotoS3, tmp_path: Path
) -> None:
    serde = registry.add_crate("serde", "1.0.0")
    rand = registry.add_crate("rand", "0.8.5")
    late = registry.add_crate("serde", "1.0.1")
    text = moto.yaml() + f"coordination:\n  redis_url: {redis_server.url}\n"
    async with (
        replicas(registry.index_url, tmp_path, 3, config_text=text) as (a, b, c),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        # 60 concurrent requests spread over the replicas for one uncached crate: one upstream download.
        registry.gate = gate = asyncio.Event()
        urls = itertools.cycle(f"{m.url}/api/v1/crates/serde/1.0.0/download" for m in (a, b, c))
        tasks = [asyncio.create_task(get(session, next(urls))) for _ in range(CLIENTS)]
        try:
            await asyncio.wait_for(registry.hold_started.wait(), timeout=30)
        finally:
            gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        assert [(status, body == serde.data) for status, _, body in results] == [(200, True)] * CLIENTS
        assert registry.count("/crates/serde/1.0.0/download") == 1, dict(registry.requests)
        assert registry.count("/index/se/rd/serde") == 1, dict(registry.requests)

        # A crate stored through replica A is a HIT on B and C, with no upstream request at all.
        assert await get(session, f"{a.url}/api/v1/crates/rand/0.8.5/download") == (200, "MISS", rand.data)
        registry.reset_counts()
        for mirror in (b, c):
            assert await get(session, f"{mirror.url}/api/v1/crates/rand/0.8.5/download") == (
                200,
                "HIT",
                rand.data,
            )
        assert registry.requests.total() == 0, dict(registry.requests)

        # A replica killed with SIGKILL takes nothing with it: what it stored stays a hit elsewhere.
        assert (await get(session, f"{a.url}/api/v1/crates/serde/1.0.1/download"))[2] == late.data

        async def uploaded() -> bool:  # the client has its bytes before the upload ends
            return "crates/serde/1.0.1.crate" in await asyncio.to_thread(moto.object_keys)

        await wait_until(uploaded, "replica A to store serde 1.0.1 in the bucket", timeout=20, interval=0.05)
        assert a.proc is not None
        os.killpg(a.proc.pid, signal.SIGKILL)
        await a.proc.wait()
        registry.reset_counts()
        assert await get(session, f"{c.url}/api/v1/crates/serde/1.0.1/download") == (200, "HIT", late.data)
        assert registry.requests.total() == 0, dict(registry.requests)


async def test_redirect_mode_sends_clients_to_the_store(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    cv = registry.add_crate("serde", "1.0.0")
    async with (
        replicas(registry.index_url, tmp_path, 1, config_text=moto.yaml(serve="redirect")) as (mirror,),
        aiohttp.ClientSession() as session,
    ):
        url = f"{mirror.url}/api/v1/crates/serde/1.0.0/download"
        assert await get(session, url) == (200, "MISS", cv.data)  # the first client gets the fill

        async def uploaded() -> bool:
            return "crates/serde/1.0.0.crate" in await asyncio.to_thread(moto.object_keys)

        await wait_until(uploaded, "the crate in the bucket", timeout=20, interval=0.05)
        async with session.get(url, allow_redirects=False) as response:
            assert response.status == 302
            location = response.headers["Location"]
        assert location.startswith(moto.endpoint) and "X-Amz-Signature=" in location
        async with session.get(location) as response:  # what cargo does: follow it
            assert response.status == 200
            assert hashlib.sha256(await response.read()).hexdigest() == cv.cksum
        assert registry.count("/crates/serde/1.0.0/download") == 1


async def test_real_cargo_follows_the_redirects_to_the_store(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publish_small_tree(registry)
    project = tmp_path / "app"
    write_cargo_project(project, SMALL_TREE_DEPS)
    async with replicas(registry.index_url, tmp_path, 1, config_text=moto.yaml(serve="redirect")) as (
        mirror,
    ):
        cold = tmp_path / "home-cold"
        write_cargo_home(cold, f"{mirror.url}/index/")
        code, output = await run_cargo(["fetch"], project, cold)
        assert code == 0, output

        async def all_uploaded() -> bool:
            keys = await asyncio.to_thread(moto.object_keys)
            return sum(key.startswith("crates/") for key in keys) == len(SMALL_TREE_RESOLVED)

        await wait_until(all_uploaded, "every crate in the bucket", timeout=20, interval=0.05)
        registry.reset_counts()
        caplog.clear()
        (project / "Cargo.lock").unlink()
        warm = tmp_path / "home-warm"
        write_cargo_home(warm, f"{mirror.url}/index/")
        code, output = await run_cargo(["fetch"], project, warm)
        assert code == 0, output
        assert_lockfile(project, registry)
        assert registry.requests.total() == 0, dict(registry.requests)
        # The bytes came from the store: moto's server logged cargo's GETs of the presigned URLs.
        fetched = [r.getMessage() for r in caplog.records if f"GET /{moto.bucket}/crates/" in r.getMessage()]
        assert len(fetched) == len(SMALL_TREE_RESOLVED), fetched
        assert all("X-Amz-Signature" in line for line in fetched), fetched


async def test_warm_fills_the_bucket_for_every_replica(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    """`cratemirror warm --config` with storage s3 (the tool runs the server's own services): a replica
    that never saw these crates serves them from the bucket with the upstream down."""
    expected = publish_sample(registry)
    project = await real_lockfile(tmp_path, registry)
    config = write_config(tmp_path / "warm.yaml", registry.index_url, tmp_path / "warm-cache")
    config.write_text(config.read_text() + moto.yaml())
    result = await run_cli("warm", str(project / "Cargo.lock"), "--config", str(config), cwd=tmp_path)
    assert result.code == 0, result.output
    keys = await asyncio.to_thread(moto.object_keys)
    assert sum(key.startswith("crates/") for key in keys) == len(expected), keys

    registry.down = True
    registry.reset_counts()
    async with (
        replicas(registry.index_url, tmp_path, 1, config_text=moto.yaml()) as (mirror,),
        aiohttp.ClientSession() as session,
    ):
        for name, version in expected.items():
            url = f"{mirror.url}/api/v1/crates/{name}/{quote(version, safe='')}/download"
            assert await get(session, url) == (200, "HIT", registry.get_version(name, version).data), name
    assert registry.requests.total() == 0, dict(registry.requests)
