"""Concurrent misses for one key cause one upstream request; a fill outlives the client that started it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.fake_upstream import FakeRegistry
from tests.mirror_process import metric_value, wait_until

CLIENTS = 20
DOWNLOAD = "/api/v1/crates/serde/1.0.0/download"


async def coalesced(mirror: TestClient[Any, Any], kind: str) -> float:
    response = await mirror.get("/metrics")
    return metric_value(await response.text(), "cratemirror_coalesced_requests_total", kind=kind)


async def fetch(mirror: TestClient[Any, Any], path: str) -> tuple[int, str, bytes]:
    async with mirror.session.get(mirror.make_url(path)) as response:
        return response.status, response.headers.get("X-Cache", ""), await response.read()


async def test_concurrent_crate_misses_share_one_fetch(
    registry: FakeRegistry, mirror: TestClient[Any, Any]
) -> None:
    cv = registry.add_crate("serde", "1.0.0")
    registry.gate = gate = asyncio.Event()
    tasks = [asyncio.create_task(fetch(mirror, DOWNLOAD)) for _ in range(CLIENTS)]
    try:
        await asyncio.wait_for(registry.hold_started.wait(), timeout=10)

        async def all_joined() -> bool:
            return await coalesced(mirror, "crate") == CLIENTS - 1

        # Every client has joined the one in-flight fill before upstream answers.
        await wait_until(all_joined, f"{CLIENTS - 1} clients to join the fill")
        assert registry.held == 1
        assert not any(task.done() for task in tasks)
    finally:
        gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    assert {status for status, _, _ in results} == {200}
    assert {body for _, _, body in results} == {cv.data}
    assert hashlib.sha256(results[0][2]).hexdigest() == cv.cksum
    assert {x_cache for _, x_cache, _ in results} == {"MISS"}
    assert registry.count("/crates/serde/1.0.0/download") == 1
    assert registry.count("/index/se/rd/serde") == 1
    assert registry.count("/index/config.json") == 1
    assert registry.requests.total() == 3
    assert await coalesced(mirror, "crate") == CLIENTS - 1
    # The index lookups the downloads did internally are not client index requests.
    assert await coalesced(mirror, "index") == 0


async def test_concurrent_large_crate_misses_stream_one_fetch(
    registry: FakeRegistry, mirror: TestClient[Any, Any]
) -> None:
    """Above the verify-before-send size every joiner streams the growing temp file."""
    cv = registry.add_crate("big", "1.0.0", pad_to=6 * 1024 * 1024)
    registry.gate = gate = asyncio.Event()
    path = "/api/v1/crates/big/1.0.0/download"
    tasks = [asyncio.create_task(fetch(mirror, path)) for _ in range(5)]
    try:
        await asyncio.wait_for(registry.hold_started.wait(), timeout=10)

        async def all_joined() -> bool:
            return await coalesced(mirror, "crate") == 4

        await wait_until(all_joined, "4 clients to join the fill")
    finally:
        gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    assert [(status, body == cv.data) for status, _, body in results] == [(200, True)] * 5
    assert registry.count("/crates/big/1.0.0/download") == 1
    assert registry.requests.total() == 3


async def test_concurrent_index_misses_share_one_fetch(
    registry: FakeRegistry, mirror: TestClient[Any, Any]
) -> None:
    registry.add_crate("serde", "1.0.0")
    registry.add_crate("serde", "1.0.1")
    registry.delay = 1.0  # the index is not gated: a slow upstream keeps the fetch in flight
    tasks = [asyncio.create_task(fetch(mirror, "/index/se/rd/serde")) for _ in range(CLIENTS)]
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    registry.delay = 0
    assert {(status, body) for status, _, body in results} == {(200, registry.index_file("serde"))}
    # All of them arrived while the fetch was in flight (a later one would have been a HIT).
    assert [x_cache for _, x_cache, _ in results] == ["MISS"] * CLIENTS
    assert registry.count("/index/se/rd/serde") == 1
    assert registry.requests.total() == 1
    assert await coalesced(mirror, "index") == CLIENTS - 1


async def test_fill_survives_the_client_that_started_it(
    registry: FakeRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    cv = registry.add_crate("serde", "1.0.0")
    registry.gate = gate = asyncio.Event()
    leaver = asyncio.create_task(fetch(mirror, DOWNLOAD))
    try:
        await asyncio.wait_for(registry.hold_started.wait(), timeout=10)
        leaver.cancel()  # the client disconnects while upstream is still answering
        with contextlib.suppress(asyncio.CancelledError):
            await leaver
    finally:
        gate.set()
    stored = tmp_path / "cache" / "crates" / "serde" / "serde-1.0.0.crate"

    async def is_stored() -> bool:
        return stored.exists()

    await wait_until(is_stored, "the abandoned fill to be stored")
    assert stored.read_bytes() == cv.data
    status, x_cache, body = await fetch(mirror, DOWNLOAD)
    assert (status, x_cache, body == cv.data) == (200, "HIT", True)
    assert registry.count("/crates/serde/1.0.0/download") == 1
    assert registry.requests.total() == 3
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


@pytest.mark.parametrize("clients", [2, 8])
@pytest.mark.parametrize("moment", ["before-headers", "mid-body"])
async def test_client_that_leaves_does_not_disturb_the_others(
    registry: FakeRegistry, mirror: TestClient[Any, Any], clients: int, moment: str
) -> None:
    """The first client leaves (its handler is cancelled, as aiohttp does with handler_cancellation)
    while the others wait on the same fill: they must still get the crate."""
    cv = registry.add_crate("serde", "1.0.0")
    if moment == "before-headers":
        registry.gate = gate = asyncio.Event()
    else:
        registry.stall_after_bytes = len(cv.data) // 2
    tasks = [asyncio.create_task(fetch(mirror, DOWNLOAD)) for _ in range(clients)]
    try:
        if moment == "before-headers":
            await asyncio.wait_for(registry.hold_started.wait(), timeout=10)

        async def all_joined() -> bool:
            return await coalesced(mirror, "crate") == clients - 1

        await wait_until(all_joined, "every client to join")
        tasks[0].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[0]
    finally:
        if moment == "before-headers":
            gate.set()
        registry.stall_after_bytes = None
    results = await asyncio.wait_for(asyncio.gather(*tasks[1:], return_exceptions=True), timeout=30)
    summary = [r if isinstance(r, BaseException) else (r[0], r[2] == cv.data) for r in results]
    assert summary == [(200, True)] * (clients - 1)
    assert registry.count("/crates/serde/1.0.0/download") == 1
    assert registry.requests.total() == 3
    status, x_cache, body = await fetch(mirror, DOWNLOAD)
    assert (status, x_cache, body == cv.data) == (200, "HIT", True)
    assert registry.requests.total() == 3
