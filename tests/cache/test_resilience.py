"""Fault injection against a mirror in front of the fake upstream: stale-if-error, the negative cache,
retries and timeouts, upstream health, the connection cap, eviction and client disconnects.

Every test checks both what the client got and how many requests reached the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from cratemirror.cache.eviction import evict_to
from cratemirror.fleet.storage.disk import Store
from cratemirror.http.context import MIRROR
from tests.conftest import MirrorFactory
from tests.fake_upstream import CHUNK_SIZE, FakeRegistry, index_path
from tests.mirror_process import metric_value, wait_until

Client = TestClient[Any, Any]

STALE_METRIC = {"kind": "index", "result": "stale"}


def index_url(name: str) -> str:
    return f"/index/{index_path(name)}"


def crate_url(name: str, version: str) -> str:
    return f"/api/v1/crates/{name}/{version}/download"


def upstream_crate(name: str, version: str) -> str:
    """The path the fake upstream counts for a tarball download."""
    return f"/crates/{name}/{version}/download"


async def metric(client: Client, name: str, **labels: str) -> float:
    response = await client.get("/metrics")
    assert response.status == 200
    return metric_value(await response.text(), name, **labels)


def store_of(client: Client) -> Store:
    app: web.Application | None = client.app
    assert app is not None
    return app[MIRROR].default.store


def temp_files(store: Store) -> list[Path]:
    return sorted(store.tmp_dir.glob("*.part"))


def crate_bytes_on_disk(store: Store) -> int:
    total = 0
    for path in store.iter_crate_files():
        with contextlib.suppress(FileNotFoundError):  # evicted while we count
            total += path.stat().st_size
    return total


# ---- stale-if-error ----------------------------------------------------------------------------------


def _inject(registry: FakeRegistry, fault: str) -> int:
    """Break the upstream in one way; returns the status a client gets when nothing stale may be served."""
    if fault == "reset":
        registry.down = True
        return 502
    if fault == "timeout":
        registry.delay = 5.0  # far past upstream.timeout; the fake wakes up when stopped
        return 504
    registry.status_override = int(fault)
    if fault == "429":
        registry.retry_after = "0"
    return 502


@pytest.mark.parametrize("fault", ["reset", "timeout", "500", "503", "429"])
async def test_stale_if_error_for_every_failure_kind(
    registry: FakeRegistry, mirror_factory: MirrorFactory, fault: str
) -> None:
    registry.add_crate("foo", "1.0.0")
    path = index_url("foo")
    # Both share the cache dir; index_ttl 0 makes every request revalidate.
    lenient = await mirror_factory(cache__index_ttl=0, upstream__timeout=0.5, upstream__retries=1)
    strict = await mirror_factory(
        cache__index_ttl=0, cache__stale_if_error=0, upstream__timeout=0.5, upstream__retries=1
    )
    warm = await lenient.get(path)
    assert warm.status == 200 and warm.headers["X-Cache"] == "MISS"
    cached = await warm.read()
    assert cached == registry.index_file("foo")

    failing_status = _inject(registry, fault)
    before = registry.count(path)
    stale = await lenient.get(path)
    assert stale.status == 200, await stale.text()
    assert stale.headers["X-Cache"] == "STALE"
    assert await stale.read() == cached
    assert await metric(lenient, "cratemirror_cache_requests_total", **STALE_METRIC) == 1
    lenient_requests = registry.count(path) - before

    # stale_if_error 0: nothing may be served past the TTL, so the failure reaches the client.
    refused = await strict.get(path)
    assert refused.status == failing_status, await refused.text()
    assert await metric(strict, "cratemirror_cache_requests_total", **STALE_METRIC) == 0
    strict_requests = registry.count(path) - before - lenient_requests

    # upstream.retries 1: one attempt and one retry per client request, whatever the failure. A reset
    # on a kept-alive connection is also retried once on a fresh one by aiohttp itself (RFC 9112
    # 9.3.1.1: the server may have closed an idle connection), so each attempt may cost two.
    per_attempt = 2 if fault == "reset" else 1
    assert (lenient_requests, strict_requests) == (2 * per_attempt, 2 * per_attempt)


# ---- negative cache ----------------------------------------------------------------------------------


async def test_negative_cache_costs_one_request_per_spelling(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    remembering = await mirror_factory(cache__negative_ttl=60)
    spellings = ["a-b_c", "a-b-c", "a_b_c"]  # cargo tries each -/_ permutation of a missing name
    paths = [index_url(name) for name in spellings]
    assert len(set(paths)) == 3

    burst = await asyncio.gather(*(remembering.get(path) for path in paths for _ in range(5)))
    assert [response.status for response in burst] == [404] * 15
    for _ in range(3):
        for path in paths:
            again = await remembering.get(path)
            assert again.status == 404 and again.headers["X-Cache"] == "HIT"
    assert [registry.count(path) for path in paths] == [1, 1, 1]
    assert await metric(remembering, "cratemirror_cache_requests_total", kind="index", result="negative") >= 9

    registry.add_crate("a-b_c", "1.0.0")
    # Within negative_ttl the remembered 404 still answers, without asking.
    assert (await remembering.get(paths[0])).status == 404
    assert registry.count(paths[0]) == 1

    # Past negative_ttl (0 here, same cache dir) the published crate appears.
    forgetting = await mirror_factory(cache__negative_ttl=0)
    found = await forgetting.get(paths[0])
    assert found.status == 200 and found.headers["X-Cache"] == "MISS"
    assert await found.read() == registry.index_file("a-b_c")
    assert registry.count(paths[0]) == 2
    for path in paths[1:]:  # the other spellings are still not index files upstream
        assert (await forgetting.get(path)).status == 404
        assert registry.count(path) == 2
    crate = await forgetting.get(crate_url("a-b_c", "1.0.0"))
    assert crate.status == 200
    assert await crate.read() == registry.get_version("a-b_c", "1.0.0").data


async def test_negative_cache_also_answers_downloads(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    client = await mirror_factory(cache__negative_ttl=60)
    path = index_url("missing")
    assert (await client.get(path)).status == 404
    for _ in range(3):
        download = await client.get(crate_url("missing", "1.0.0"))
        assert download.status == 404
    assert registry.count(path) == 1  # the remembered 404 answers the downloads' index lookups too
    assert registry.count("/crates/") == 0


async def test_crate_removed_upstream_becomes_404_on_revalidation(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    registry.add_crate("gone", "1.0.0")
    client = await mirror_factory(cache__index_ttl=0, cache__negative_ttl=0)
    path = index_url("gone")
    assert (await client.get(path)).status == 200
    registry.remove_crate("gone")
    removed = await client.get(path)
    assert removed.status == 404, await removed.text()
    assert registry.count(path) == 2


# ---- retries and timeouts ----------------------------------------------------------------------------


async def test_every_other_503_is_retried(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    cv = registry.add_crate("flaky", "1.0.0")
    client = await mirror_factory(upstream__retries=1)
    registry.fail_every_other = 503
    index = await client.get(index_url("flaky"))
    assert index.status == 200
    assert await index.read() == registry.index_file("flaky")
    assert registry.count(index_url("flaky")) == 2
    crate = await client.get(crate_url("flaky", "1.0.0"))
    assert crate.status == 200
    assert await crate.read() == cv.data
    assert registry.count(upstream_crate("flaky", "1.0.0")) == 2
    assert registry.count("/index/config.json") == 2


async def test_without_retries_a_503_is_a_502(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    registry.add_crate("flaky", "1.0.0")
    client = await mirror_factory(upstream__retries=0)
    registry.fail_every_other = 503
    failed = await client.get(index_url("flaky"))
    assert failed.status == 502
    assert registry.count(index_url("flaky")) == 1
    # A failure is not remembered: the next request (which upstream answers) succeeds.
    ok = await client.get(index_url("flaky"))
    assert ok.status == 200 and ok.headers["X-Cache"] == "MISS"
    assert registry.count(index_url("flaky")) == 2


async def _timed_get(client: Client, path: str) -> tuple[aiohttp.ClientResponse, float]:
    started = time.monotonic()
    response = await client.get(path)
    await response.read()
    return response, time.monotonic() - started


async def test_429_retry_after_is_honoured(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    registry.add_crate("busy", "1.0.0")
    path = index_url("busy")
    # Retry-After: 0 -> retried at once.
    zero = await mirror_factory(upstream__retries=1, upstream__timeout=2.0, cache__index_ttl=0)
    registry.retry_after = "0"
    registry.fail_every_other = 429
    response, elapsed = await _timed_get(zero, path)
    assert response.status == 200 and elapsed < 1.0
    assert registry.count(path) == 2

    # Retry-After: 1 -> waits that second (jittered backoff alone would be ~0.1 s).
    registry.retry_after = "1"
    registry.fail_every_other = 429
    response, elapsed = await _timed_get(zero, path)
    assert response.status == 200 and response.headers["X-Cache"] == "REVALIDATED"
    assert elapsed >= 0.9
    assert registry.count(path) == 4

    # Retry-After: an hour -> capped at one attempt's timeout.
    capped = await mirror_factory(upstream__retries=1, upstream__timeout=0.5, cache__index_ttl=0)
    registry.retry_after = "3600"
    registry.fail_every_other = 429
    response, elapsed = await _timed_get(capped, path)
    assert response.status == 200 and elapsed < 0.5 + 1.5
    assert registry.count(path) == 6


async def test_hung_upstream_answers_504_in_bounded_time(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    registry.add_crate("hang", "1.0.0")
    timeout, retries = 0.5, 1
    client = await mirror_factory(upstream__timeout=timeout, upstream__retries=retries)
    gate = asyncio.Event()
    registry.gate = gate  # tarball requests park before their headers
    try:
        response, elapsed = await _timed_get(client, crate_url("hang", "1.0.0"))
    finally:
        gate.set()
    assert response.status == 504, await response.text()
    assert elapsed < timeout * (retries + 1) + 2.0
    assert registry.count(upstream_crate("hang", "1.0.0")) == retries + 1
    assert not store_of(client).crate_path("hang", "1.0.0").exists()


async def test_stall_mid_body_is_retried_then_504_and_nothing_stored(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    cv = registry.add_crate("stall", "1.0.0", pad_to=256 * 1024)
    client = await mirror_factory(upstream__timeout=0.5, upstream__retries=1)
    store = store_of(client)
    registry.stall_after_bytes = 4 * CHUNK_SIZE
    response, elapsed = await _timed_get(client, crate_url("stall", "1.0.0"))
    assert response.status == 504, await response.text()
    assert elapsed < 0.5 * 2 + 2.0
    assert registry.count(upstream_crate("stall", "1.0.0")) == 2
    assert not store.crate_path("stall", "1.0.0").exists()
    assert store.get_crate_meta("stall", "1.0.0") is None
    assert temp_files(store) == []

    registry.stall_after_bytes = None
    ok = await client.get(crate_url("stall", "1.0.0"))
    assert ok.status == 200 and ok.headers["X-Cache"] == "MISS"
    assert await ok.read() == cv.data
    assert registry.count(upstream_crate("stall", "1.0.0")) == 3
    assert temp_files(store) == []


# ---- upstream health ---------------------------------------------------------------------------------


async def test_upstream_marked_down_fails_fast_then_recovers(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    cv = registry.add_crate("kept", "1.0.0")
    registry.add_crate("never", "1.0.0")
    # retries 2: one request's three failed attempts mark the upstream down.
    client = await mirror_factory(cache__index_ttl=0, upstream__retries=2, upstream__timeout=0.5)
    assert (await client.get(crate_url("kept", "1.0.0"))).status == 200
    assert await metric(client, "cratemirror_upstream_up") == 1

    registry.down = True
    first = await client.get(index_url("kept"))
    assert first.status == 200 and first.headers["X-Cache"] == "STALE"
    assert await metric(client, "cratemirror_upstream_up") == 0
    sent = sum(registry.requests.values())

    # While down: no upstream request at all, whatever is asked.
    stale = await client.get(index_url("kept"))
    assert stale.status == 200 and stale.headers["X-Cache"] == "STALE"
    assert await stale.read() == registry.index_file("kept")
    uncached = await client.get(index_url("never"))
    assert uncached.status == 502, await uncached.text()
    download = await client.get(crate_url("never", "1.0.0"))
    assert download.status == 502
    hit = await client.get(crate_url("kept", "1.0.0"))
    assert hit.status == 200 and hit.headers["X-Cache"] == "HIT"
    assert await hit.read() == cv.data
    assert sum(registry.requests.values()) == sent

    # Upstream back: after the ~1 s interval one probe gets through and the mirror is up again.
    registry.down = False

    async def revalidated() -> bool:
        response = await client.get(index_url("kept"))
        assert response.status == 200
        return response.headers["X-Cache"] == "REVALIDATED"

    await wait_until(revalidated, "the mirror to probe the recovered upstream", timeout=5.0, interval=0.05)
    assert sum(registry.requests.values()) == sent + 1  # only the probe
    assert await metric(client, "cratemirror_upstream_up") == 1
    assert (await client.get(index_url("never"))).status == 200


# ---- bounded upstream load ---------------------------------------------------------------------------


async def test_upstream_connections_are_capped(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    names = [f"capped{n:02d}" for n in range(20)]
    data = {name: registry.add_crate(name, "1.0.0").data for name in names}
    client = await mirror_factory(upstream__max_connections=2, upstream__timeout=10.0)
    gate = asyncio.Event()
    registry.gate = gate
    downloads = [asyncio.ensure_future(client.get(crate_url(name, "1.0.0"))) for name in names]
    try:

        async def two_parked() -> bool:
            return registry.held >= 2

        await wait_until(two_parked, "two tarball requests parked upstream")
        # Watch a while: more requests would show up parked (or at least counted) if the cap leaked.
        most = 0
        for _ in range(15):
            most = max(most, registry.held)
            await asyncio.sleep(0.02)
        assert most == 2
        assert registry.count("/crates/") == 2
    finally:
        gate.set()
    responses = await asyncio.gather(*downloads)
    for name, response in zip(names, responses, strict=True):
        assert response.status == 200
        assert await response.read() == data[name]
    assert registry.count("/crates/") == 20


# ---- eviction ----------------------------------------------------------------------------------------


async def test_lru_eviction_past_max_size(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    names = ["eva", "evb", "evc", "evd", "eve"]
    data = {name: registry.add_crate(name, "1.0.0", pad_to=64 * 1024).data for name in names}
    largest = max(len(body) for body in data.values())
    max_size = 3 * largest + largest // 2  # three fit, four do not
    client = await mirror_factory(cache__max_size=max_size)
    store = store_of(client)

    async def fetch(name: str, x_cache: str) -> None:
        response = await client.get(crate_url(name, "1.0.0"))
        assert response.status == 200 and response.headers["X-Cache"] == x_cache
        assert await response.read() == data[name]

    async def within_max_size() -> bool:
        return crate_bytes_on_disk(store) <= max_size

    for name in names[:3]:
        await fetch(name, "MISS")
    # Pretend they were stored hours apart (recency is refreshed at most hourly on a hit).
    now = time.time()
    for hours, name in zip((4, 3, 2), names[:3], strict=True):
        os.utime(store.crate_path(name, "1.0.0"), (now - hours * 3600, now - hours * 3600))
        store.touch_crate(name, "1.0.0", now - hours * 3600)
    await fetch("eva", "HIT")  # the oldest, but just used

    await fetch("evd", "MISS")
    await wait_until(within_max_size, "eviction down to cache.max_size")
    await fetch("eve", "MISS")
    await wait_until(within_max_size, "eviction down to cache.max_size")
    on_disk = {path.parent.name for path in store.iter_crate_files()}
    assert on_disk == {"eva", "evd", "eve"}  # evb and evc were the least recently used

    await fetch("evb", "MISS")  # evicted: fetched again, transparently
    assert registry.count(upstream_crate("evb", "1.0.0")) == 2
    assert registry.count(upstream_crate("eva", "1.0.0")) == 1
    await wait_until(within_max_size, "eviction down to cache.max_size")


def _open_deleted(path: Path) -> bool:
    """Whether this process holds `path` open although it was unlinked."""
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == f"{path} (deleted)":
                return True
    return False


async def _slow_reader(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection with a tiny receive buffer, so the server cannot push the whole file at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=8192)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def test_eviction_racing_a_read_keeps_the_answer_whole(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    cv = registry.add_crate("raced", "1.0.0", pad_to=3 * 1024 * 1024)
    client = await mirror_factory()
    store = store_of(client)
    assert (await client.get(crate_url("raced", "1.0.0"))).status == 200
    final = store.crate_path("raced", "1.0.0")

    port = client.server.port
    assert port is not None
    reader, writer = await _slow_reader(port, crate_url("raced", "1.0.0"))
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b" 200 " in head.split(b"\r\n", 1)[0] and b"X-Cache: HIT" in head
        body = await asyncio.wait_for(reader.readexactly(64 * 1024), 5)
        report = await asyncio.to_thread(evict_to, store, 0)
        assert [item.name for item in report.removed] == ["raced"]
        assert not final.exists()
        assert _open_deleted(final), "the hit was no longer being sent: the race did not happen"
        body += await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert len(body) == len(cv.data)
    assert hashlib.sha256(body).hexdigest() == cv.cksum

    again = await client.get(crate_url("raced", "1.0.0"))  # evicted: one more upstream request
    assert again.status == 200 and await again.read() == cv.data
    assert registry.count(upstream_crate("raced", "1.0.0")) == 2


# ---- client disconnects ------------------------------------------------------------------------------


def _stored(store: Store, name: str, version: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return store.crate_path(name, version).exists() and store.get_crate_meta(name, version) is not None

    return check


async def test_client_disconnect_before_the_body_does_not_cancel_the_fill(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    cv = registry.add_crate("leaver", "1.0.0")
    client = await mirror_factory()
    store = store_of(client)
    gate = asyncio.Event()
    registry.gate = gate
    leaving = asyncio.ensure_future(client.get(crate_url("leaver", "1.0.0")))
    try:
        await asyncio.wait_for(registry.hold_started.wait(), 5)
        leaving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leaving
    finally:
        gate.set()
    await wait_until(_stored(store, "leaver", "1.0.0"), "the abandoned fill to be stored")
    hit = await client.get(crate_url("leaver", "1.0.0"))
    assert hit.status == 200 and hit.headers["X-Cache"] == "HIT"
    assert await hit.read() == cv.data
    assert registry.count(upstream_crate("leaver", "1.0.0")) == 1


async def test_client_disconnect_mid_body_does_not_cancel_the_fill(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    cv = registry.add_crate("halfway", "1.0.0", pad_to=5 * 1024 * 1024)  # streamed, not verified first
    client = await mirror_factory(upstream__timeout=10.0)
    store = store_of(client)
    registry.stall_after_bytes = 1024 * 1024
    response = await client.get(crate_url("halfway", "1.0.0"))
    assert response.status == 200 and response.headers["X-Cache"] == "MISS"
    first = await response.content.readexactly(256 * 1024)
    assert first == cv.data[: len(first)]
    response.close()  # the client goes away mid-body
    registry.stall_after_bytes = None
    await wait_until(_stored(store, "halfway", "1.0.0"), "the abandoned fill to be stored")
    hit = await client.get(crate_url("halfway", "1.0.0"))
    assert hit.status == 200 and hit.headers["X-Cache"] == "HIT"
    assert await hit.read() == cv.data
    assert registry.count(upstream_crate("halfway", "1.0.0")) == 1
    assert temp_files(store) == []
