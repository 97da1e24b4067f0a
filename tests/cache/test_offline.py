"""Offline mode on a cache warmed by an earlier online mirror: serves what is cached however old,
answers 503 with a one-line reason for the rest, and never opens an upstream connection."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path


def crate_url(name: str, version: str) -> str:
    return f"/api/v1/crates/{name}/{version}/download"


async def assert_one_line_503(response: aiohttp.ClientResponse) -> None:
    text = await response.text()
    assert response.status == 503, text
    assert text.endswith("\n") and "\n" not in text.rstrip("\n") and text.strip()


async def test_offline_serves_the_warm_cache_and_never_asks_upstream(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    warm = registry.add_crate("warm", "1.0.0")
    registry.add_crate("halfwarm", "1.0.0")
    registry.add_crate("cold", "1.0.0")

    online = await mirror_factory(cache_dir=cache_dir)
    assert (await online.get(f"/index/{index_path('warm')}")).status == 200
    assert (await online.get(crate_url("warm", "1.0.0"))).status == 200
    assert (await online.get(f"/index/{index_path('halfwarm')}")).status == 200  # index only
    registry.reset_counts()

    # index_ttl 0: everything cached is "old", and offline it is served anyway.
    offline = await mirror_factory(cache_dir=cache_dir, offline=True, cache__index_ttl=0)
    config = await offline.get("/index/config.json")
    assert config.status == 200
    assert (await config.json())["dl"] == f"{str(offline.make_url('')).rstrip('/')}/api/v1/crates"

    index = await offline.get(f"/index/{index_path('warm')}")
    assert index.status == 200 and index.headers["X-Cache"] == "STALE"
    assert await index.read() == registry.index_file("warm")
    crate = await offline.get(crate_url("warm", "1.0.0"))
    assert crate.status == 200 and crate.headers["X-Cache"] == "HIT"
    assert await crate.read() == warm.data

    await assert_one_line_503(await offline.get(f"/index/{index_path('cold')}"))
    await assert_one_line_503(await offline.get(crate_url("cold", "1.0.0")))
    await assert_one_line_503(await offline.get(crate_url("halfwarm", "1.0.0")))

    assert sum(registry.requests.values()) == 0, registry.request_log  # not even config.json
