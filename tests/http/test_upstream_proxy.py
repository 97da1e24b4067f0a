"""The outbound proxy: `upstream.proxy`, or HTTP_PROXY / HTTPS_PROXY / NO_PROXY from the environment,
through a real forward proxy on loopback (an aiohttp server taking absolute-form requests)."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cratemirror.upstream.proxies import bypassed
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path
from tests.mirror_process import Service


class ForwardProxy(Service):
    """Forwards each absolute-form GET and counts it by the URL it was asked for."""

    def __init__(self) -> None:
        self.seen: collections.Counter[str] = collections.Counter()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    async def _forward(self, request: web.Request) -> web.Response:
        target = str(request.url)
        self.seen[target] += 1
        assert self._client is not None
        async with self._client.get(target, allow_redirects=False) as upstream:
            body = await upstream.read()
            return web.Response(status=upstream.status, body=body, content_type=upstream.content_type)

    async def start(self) -> None:
        self._client = aiohttp.ClientSession(trust_env=False)
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    async with ForwardProxy() as running:
        yield running


async def fetch_serde(registry: FakeRegistry, mirror: Any) -> None:
    registry.add_crate("serde", "1.0.0")
    response = await mirror.get(f"/index/{index_path('serde')}")
    assert response.status == 200
    response = await mirror.get("/api/v1/crates/serde/1.0.0/download")
    assert response.status == 200
    assert await response.read() == registry.get_version("serde", "1.0.0").data


async def test_the_environment_proxy_carries_every_upstream_request(
    registry: FakeRegistry,
    mirror_factory: MirrorFactory,
    proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    mirror = await mirror_factory()
    await fetch_serde(registry, mirror)
    assert proxy.seen[f"{registry.url}/index/{index_path('serde')}"] == 1
    assert proxy.seen[f"{registry.url}/index/config.json"] == 1
    assert proxy.seen[f"{registry.url}/crates/serde/1.0.0/download"] == 1
    assert sum(proxy.seen.values()) == registry.requests.total() == 3


async def test_no_proxy_skips_it(
    registry: FakeRegistry,
    mirror_factory: MirrorFactory,
    proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("no_proxy", raising=False)  # the lower-case one would win
    monkeypatch.setenv("NO_PROXY", "example.com, 127.0.0.1")
    mirror = await mirror_factory()
    await fetch_serde(registry, mirror)
    assert sum(proxy.seen.values()) == 0
    assert registry.requests.total() == 3


async def test_the_configured_proxy_wins_over_the_environment(
    registry: FakeRegistry,
    mirror_factory: MirrorFactory,
    proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # discard port: nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    mirror = await mirror_factory(upstream__proxy=proxy.url)
    await fetch_serde(registry, mirror)
    assert sum(proxy.seen.values()) == 3


@pytest.mark.parametrize(
    ("host", "no_proxy", "expected"),
    [
        ("index.crates.io", "crates.io", True),
        ("index.crates.io", ".crates.io", True),
        ("INDEX.crates.io", "Crates.IO", True),
        ("crates.io", "crates.io", True),
        ("notcrates.io", "crates.io", False),
        ("index.crates.io", "", False),
        ("anything", "*", True),
        ("127.0.0.1", "localhost, 127.0.0.1", True),
        ("::1", "::1", True),
    ],
)
def test_no_proxy_matching(host: str, no_proxy: str, expected: bool) -> None:
    assert bypassed(host, no_proxy) is expected
