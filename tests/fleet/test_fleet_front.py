"""The fleet's front: the real cargo over https + HTTP/2 through the real HAProxy running
deploy/haproxy/haproxy.cfg, three real mirror replicas behind it; a replica killed with SIGKILL while
cargo fetches costs no client request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from tests.e2e.test_e2e_cargo import assert_lockfile, tarball_fetches
from tests.fake_upstream import (
    SMALL_TREE_DEPS,
    SMALL_TREE_RESOLVED,
    FakeRegistry,
    publish_small_tree,
    run_cargo,
    write_cargo_home,
    write_cargo_project,
)
from tests.fleet_support import FrontTLS, HAProxy, MotoS3, RedisServer, connected_to, make_tls, replicas
from tests.mirror_process import MirrorProcess, wait_until


@dataclass
class Fleet:
    front: HAProxy
    replicas: list[MirrorProcess]
    tls: FrontTLS

    @property
    def index_url(self) -> str:
        return f"{self.front.url}/index/"


@asynccontextmanager
async def fleet(
    registry: FakeRegistry, tmp_path: Path, count: int = 3, config_text: str = ""
) -> AsyncIterator[Fleet]:
    """`count` mirror processes (one worker each, own cache dir) behind HAProxy with a test CA."""
    tls = make_tls(tmp_path / "tls")
    async with (
        replicas(registry.index_url, tmp_path, count, config_text=config_text) as mirrors,
        HAProxy(tmp_path, tls, [("127.0.0.1", m.port) for m in mirrors]) as front,
    ):
        yield Fleet(front, mirrors, tls)


def cargo_home(path: Path, fleet: Fleet) -> Path:
    write_cargo_home(path, fleet.index_url)
    with (path / "config.toml").open("a") as config:
        config.write(f'\n[http]\ncainfo = "{fleet.tls.ca_cert}"\nmultiplexing = true\n')
    return path


async def test_cargo_over_https_and_http2_through_the_front(registry: FakeRegistry, tmp_path: Path) -> None:
    publish_small_tree(registry)
    project = tmp_path / "app"
    write_cargo_project(project, SMALL_TREE_DEPS)
    async with fleet(registry, tmp_path) as f:
        # The replicas build their URLs from X-Forwarded-Proto/Host: cargo is sent back to the front.
        context = ssl.create_default_context(cafile=str(f.tls.ca_cert))
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
            session.get(f"{f.index_url}config.json") as response,
        ):
            assert response.status == 200
            assert json.loads(await response.read())["dl"] == f"{f.front.url}/api/v1/crates"

        home = cargo_home(tmp_path / "home", f)
        code, output = await run_cargo(["fetch"], project, home)
        assert code == 0, f"cargo fetch over https failed:\n{output}\n{f.front.output()}"
        assert_lockfile(project, registry)

        log = f.front.output()
        downloads = [line for line in log.splitlines() if "/api/v1/crates/" in line]
        assert len(downloads) == len(SMALL_TREE_RESOLVED), log
        assert all("HTTP/2.0" in line for line in downloads), log  # cargo multiplexed over h2
        # Consistent URI hashing: each crate went to one replica, so upstream saw it once.
        for name, version in SMALL_TREE_RESOLVED.items():
            assert tarball_fetches(registry, name, version) == 1, (name, dict(registry.requests))
        stats = await f.front.server_stats()
        assert sum(int(row["stot"]) > 0 for row in stats.values()) >= 2, stats  # the load was spread


async def test_a_replica_killed_mid_fetch_costs_cargo_nothing(registry: FakeRegistry, tmp_path: Path) -> None:
    publish_small_tree(registry)
    project = tmp_path / "app"
    write_cargo_project(project, SMALL_TREE_DEPS)
    upstream_port = urlsplit(registry.url).port
    assert upstream_port is not None
    async with fleet(registry, tmp_path) as f:
        # Every crate download parks at the upstream, so each replica that owns one is mid-request.
        registry.gate = asyncio.Event()
        home = cargo_home(tmp_path / "home", f)
        fetch = asyncio.ensure_future(run_cargo(["fetch"], project, home))
        try:

            async def all_parked() -> bool:
                assert not fetch.done(), (await fetch)[1]
                return registry.held >= len(SMALL_TREE_RESOLVED)

            await wait_until(all_parked, "cargo's crate downloads to reach the upstream", 60)
            # The victim is a replica that is answering cargo right now (HAProxy has a request on it).
            stats = await f.front.server_stats()
            busy = [m for n, m in enumerate(f.replicas, 1) if int(stats[f"mirror{n}"]["scur"]) > 0]
            assert busy, stats
            victim = busy[0]
            assert victim.proc is not None and connected_to(victim.proc.pid, upstream_port)
            assert victim.proc is not None
            os.killpg(victim.proc.pid, signal.SIGKILL)
            await victim.proc.wait()
            registry.gate.set()
            code, output = await fetch
        finally:
            if not fetch.done():
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fetch
        assert code == 0, f"cargo fetch failed after a replica died:\n{output}\n{f.front.output()}"
        assert_lockfile(project, registry)

        stats = await f.front.server_stats()
        name = f"mirror{f.replicas.index(victim) + 1}"
        # The requests the dead replica never answered were sent again, to a live one.
        assert int(stats[name]["wretr"]) + int(stats[name]["wredis"]) >= 1, stats[name]
        survivors = [m for m in f.replicas if m is not victim]
        assert all(m.proc is not None and m.proc.returncode is None for m in survivors)


async def test_the_whole_fleet_keeps_a_dead_replicas_crates(
    registry: FakeRegistry, tmp_path: Path, redis_server: RedisServer, moto: MotoS3
) -> None:
    """HAProxy + 3 replicas on one bucket (moto) and one Redis: cargo fetches cold; then one replica is
    killed and the upstream goes away, and a fresh CARGO_HOME still gets everything, over HTTP/2."""
    publish_small_tree(registry)
    project = tmp_path / "app"
    write_cargo_project(project, SMALL_TREE_DEPS)
    text = moto.yaml() + f"coordination:\n  redis_url: {redis_server.url}\n"
    async with fleet(registry, tmp_path, config_text=text) as f:
        code, output = await run_cargo(["fetch"], project, cargo_home(tmp_path / "cold", f))
        assert code == 0, output
        for name, version in SMALL_TREE_RESOLVED.items():
            assert tarball_fetches(registry, name, version) == 1, (name, dict(registry.requests))

        async def all_uploaded() -> bool:
            keys = await asyncio.to_thread(moto.object_keys)
            return sum(key.startswith("crates/") for key in keys) == len(SMALL_TREE_RESOLVED)

        await wait_until(all_uploaded, "every crate in the bucket", timeout=20, interval=0.05)
        stats = await f.front.server_stats()
        victim = max(f.replicas, key=lambda m: int(stats[f"mirror{f.replicas.index(m) + 1}"]["stot"]))
        assert victim.proc is not None
        os.killpg(victim.proc.pid, signal.SIGKILL)
        await victim.proc.wait()
        registry.down = True
        registry.reset_counts()
        (project / "Cargo.lock").unlink()
        code, output = await run_cargo(["fetch"], project, cargo_home(tmp_path / "warm", f))
        assert code == 0, f"{output}\n{f.front.output()}"
        assert_lockfile(project, registry)
        assert registry.requests.total() == 0, dict(registry.requests)
