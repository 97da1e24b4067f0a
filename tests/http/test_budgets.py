"""Issue 18, finding 4: the unknown-name budget holds. It is taken before a lookup may go upstream (so
concurrent lookups cannot overdraw it), on every route that can cause one (index files, downloads,
refresh), shared by the worker processes, and refresh reaches upstream at most once per name per
second whatever the number of callers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import yaml

from cratemirror.auth.tokens import add_token
from cratemirror.cache.ratelimit import BURST, PER_SECOND
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path
from tests.mirror_process import MirrorProcess

UNKNOWN = 400


async def _statuses(session: aiohttp.ClientSession, method: str, urls: list[str]) -> list[tuple[int, str]]:
    async def one(url: str) -> tuple[int, str]:
        async with session.request(method, url) as response:
            await response.read()
            return response.status, response.headers.get("Retry-After", "")

    return await asyncio.gather(*(one(url) for url in urls))


async def test_concurrent_unknown_names_over_two_workers_stay_within_the_budget(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    registry.add_crate("serde", "1.0.0")
    registry.delay = 0.3  # every lookup is still in flight when the last one arrives
    async with (
        MirrorProcess(registry.index_url, tmp_path / "cache", tmp_path, workers=2) as mirror,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session,
    ):
        started = time.monotonic()
        urls = [f"{mirror.url}/index/{index_path(f'none{n}')}" for n in range(UNKNOWN)]
        answers = await _statuses(session, "GET", urls)
        elapsed = time.monotonic() - started
        lookups = registry.count("/none")
        assert lookups <= BURST + PER_SECOND * elapsed + 2, (lookups, elapsed)
        statuses = [status for status, _ in answers]
        assert statuses.count(404) == lookups and statuses.count(429) == UNKNOWN - lookups > 0
        assert all(int(wait) >= 1 for status, wait in answers if status == 429)
        # Downloads of unknown names draw on the same budget: only the tokens that came back since.
        downloads = [f"{mirror.url}/api/v1/crates/gone{n}/1.0.0/download" for n in range(UNKNOWN // 4)]
        statuses = [status for status, _ in await _statuses(session, "GET", downloads)]
        elapsed = time.monotonic() - started
        assert lookups + registry.count("/gone") <= BURST + PER_SECOND * elapsed + 2, elapsed
        assert statuses.count(404) == registry.count("/gone") and statuses.count(429) > 0
        # The good path: what the mirror can answer, or a name that exists, still works.
        registry.delay = 0
        async with session.get(f"{mirror.url}/index/{index_path('none0')}") as response:
            assert response.status == 404  # held: costs nothing
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=other) as elsewhere:
            async with elsewhere.get(f"{mirror.url}/index/{index_path('serde')}") as response:
                assert response.status == 200
            async with elsewhere.get(f"{mirror.url}/api/v1/crates/serde/1.0.0/download") as response:
                assert response.status == 200


async def test_downloads_of_unknown_names_are_charged(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    registry.add_crate("serde", "1.0.0")
    mirror = await mirror_factory()
    started = time.monotonic()
    statuses = []
    for number in range(BURST + 40):
        response = await mirror.get(f"/api/v1/crates/gone{number}/1.0.0/download")
        statuses.append(response.status)
    elapsed = time.monotonic() - started
    lookups = registry.count("/gone")
    assert lookups <= BURST + PER_SECOND * elapsed + 1, (lookups, elapsed)
    assert statuses.count(404) == lookups and statuses.count(429) > 0
    # Names that exist give their token back: a cold build of real crates is never refused.
    for _ in range(3):
        assert (await mirror.get("/api/v1/crates/serde/1.0.0/download")).status in (200, 429)
    await asyncio.sleep(1.2)  # tokens come back at a rate: no event marks it
    assert (await mirror.get("/api/v1/crates/serde/1.0.0/download")).status == 200


async def test_twenty_refreshes_of_one_name_make_one_upstream_request(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    registry.add_crate("serde", "1.0.0")
    path = "/" + index_path("serde")
    async with (
        MirrorProcess(registry.index_url, tmp_path / "cache", tmp_path, workers=2) as mirror,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session,
    ):
        async with session.get(f"{mirror.url}/index{path}") as response:
            assert response.status == 200
        registry.add_crate("serde", "1.0.1")
        before = registry.count(path)

        async def refresh() -> dict[str, object]:
            async with session.post(f"{mirror.url}/-/refresh/serde") as response:
                assert response.status == 200
                answer: dict[str, object] = await response.json()
                return answer

        # Five waves of four at once, one after the other (concurrent callers alone already coalesced).
        started = time.monotonic()
        answers = []
        for _ in range(5):
            answers += await asyncio.gather(*(refresh() for _ in range(4)))
        elapsed = time.monotonic() - started
        assert 1 <= registry.count(path) - before <= 1 + int(elapsed), elapsed  # one per name per second
        assert len({answer["etag"] for answer in answers}) == 1 and answers[0]["found"] is True
        async with session.get(f"{mirror.url}/index{path}") as response:
            assert b'"vers":"1.0.1"' in await response.read()
        # A second later, a refresh reaches upstream again.
        after = registry.count(path)
        await asyncio.sleep(1.1)  # the per-name interval is wall-clock time
        await refresh()
        assert registry.count(path) == after + 1


async def test_refresh_needs_a_token_when_auth_is_required(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    registry.add_crate("serde", "1.0.0")
    tokens = tmp_path / "tokens.yaml"
    token, _ = add_token(tokens, "ci", None)
    mirror = await mirror_factory(auth__required=True, auth__tokens_file=tokens)
    assert (await mirror.post("/-/refresh/serde")).status == 401
    assert registry.count("serde") == 0
    response = await mirror.post("/-/refresh/serde", headers={"Authorization": token})
    assert response.status == 200 and (await response.json())["found"] is True
    assert yaml.safe_load(tokens.read_text())["tokens"][0]["name"] == "ci"


async def test_refreshes_of_missing_names_are_charged(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    mirror = await mirror_factory()
    for number in range(BURST):  # the budget spent on names that do not exist (now remembered as such)
        assert (await mirror.get(f"/index/{index_path(f'none{number}')}")).status == 404
    before = registry.count("/none")
    statuses = [(await mirror.post(f"/-/refresh/none{number}")).status for number in range(40)]
    assert statuses.count(429) >= 40 - 20 and registry.count("/none") - before == statuses.count(200)
