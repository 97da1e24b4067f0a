"""Shared fixtures: a fake upstream registry on loopback and a mirror in front of it."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cratemirror.config.schema import CacheConfig, Config, ServerConfig, UpstreamConfig
from cratemirror.http.app import create_app
from cratemirror.http.hit_lane import HitLane, install_hit_lane
from tests.dist_server import AGENT_HOMES, stop_agents
from tests.fake_upstream import FakeRegistry
from tests.fleet_support import MotoS3, RedisServer

TIER_OF_FOLDER = {"e2e": pytest.mark.e2e, "fleet": pytest.mark.fleet}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test's tier is its folder: tests/e2e/ are `e2e`, tests/fleet/ are `fleet` (select with -m)."""
    for item in items:
        folder = item.path.parent.name
        if folder in TIER_OF_FOLDER:
            item.add_marker(TIER_OF_FOLDER[folder])


@pytest.fixture(autouse=True)
def _stop_gpg_agents() -> Iterator[None]:
    """gpg starts an agent per GNUPGHOME and leaves it running: stopped after the test that made it."""
    yield
    if AGENT_HOMES:
        stop_agents()


MirrorFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    async with FakeRegistry() as fake:
        yield fake


def make_config(index_url: str, cache_dir: Path, **changes: Any) -> Config:
    """A test config: short timeouts and quick retries so fault tests finish fast. No
    stale-while-revalidate window unless a test asks for one (`cache__stale_while_revalidate=...`):
    `cache__index_ttl=0` then means "revalidate before every answer". No dependency prefetch unless a
    test asks for it (`upstream__prefetch="index"`): the tests count upstream requests. No web API for
    `cargo search` unless a test names one (`upstream__api_url=registry.url`): never crates.io itself."""
    config = Config(
        server=ServerConfig(host="127.0.0.1", port=8080, workers=1),
        upstream=UpstreamConfig(index_url=index_url, timeout=2.0, retries=1, prefetch="off", api_url=None),
        cache=CacheConfig(dir=cache_dir, stale_while_revalidate=0),
    )
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            part = getattr(config, section)
            value = type(part)(**{**dict(part), key: value})
        config = config.model_copy(update={section: value})
    return config


# Each test mirror's hit lane (tests/http/test_hit_lane.py reads what it answered).
LANES: weakref.WeakKeyDictionary[TestClient[Any, Any], HitLane] = weakref.WeakKeyDictionary()


@pytest.fixture
def mirror_factory(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], tmp_path: Path, registry: FakeRegistry
) -> MirrorFactory:
    """Start a mirror app against the fake registry. Keyword arguments change config keys:
    `cache__index_ttl=0`, `upstream__retries=0`, `offline=True`, `cache_dir=...`."""

    async def start(cache_dir: Path | None = None, **changes: Any) -> TestClient[Any, Any]:
        config = make_config(registry.index_url, cache_dir or tmp_path / "cache", **changes)
        app = create_app(config)
        client = await aiohttp_client(app)
        # As `cratemirror serve` runs it: the hit lane in front of the app (before any connection opens).
        assert client.server.runner is not None and client.server.runner.server is not None
        LANES[client] = install_hit_lane(app, client.server.runner.server)
        return client

    return start


@pytest.fixture
async def mirror(mirror_factory: MirrorFactory) -> TestClient[Any, Any]:
    return await mirror_factory()


# ---- the fleet's services (tests/fleet/) ---------------------------------------------------------------


@pytest.fixture
def moto() -> Iterator[MotoS3]:
    """moto's S3 server on loopback with a bucket of the test's own."""
    with MotoS3() as server:
        yield server


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A real redis-server on loopback, killed at the end."""
    async with RedisServer(tmp_path / "redis") as server:
        yield server
