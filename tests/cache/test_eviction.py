"""Eviction on a big cache: least-recently-used order from the ledger, the low-water mark, totals that
stay exact through a kill -9 mid-eviction, misses that never wait for an eviction, and /metrics figures
that equal a real count of what is on disk."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from cratemirror.cache.eviction import LOW_WATER, evict_to
from cratemirror.fleet.storage.disk import CRATE_PREFIX, LEDGER_FILE, CrateMeta, Store
from cratemirror.http.context import MIRROR
from tests.cache.test_resilience import crate_url, store_of
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry
from tests.mirror_process import metric_value

EVENT_TIMEOUT = 30.0


def seed(store: Store, count: int, *, size: int = 100, start: float = 1_000_000.0) -> list[str]:
    """`count` crates written straight into the store, each used a second after the one before."""
    names = [f"seed{i:05d}" for i in range(count)]
    for i, name in enumerate(names):
        data = name.encode().ljust(size, b".")
        path = store.crate_path(name, "1.0.0")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        store.record_crate(CrateMeta(name, "1.0.0", hashlib.sha256(data).hexdigest(), size, start + i))
    return names


def seeded_cache(cache: Path, count: int) -> Path:
    store = Store(cache)
    try:
        seed(store, count)
    finally:
        store.close()
    return cache


def on_disk(store: Store) -> tuple[int, int]:
    """(bytes, files) of the crate files really there."""
    sizes = [path.stat().st_size for path in store.iter_crate_files()]
    return sum(sizes), len(sizes)


def test_least_recently_used_go_first(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    try:
        names = seed(store, 10)
        store.touch_crate(names[0], "1.0.0", 2_000_000.0)  # the oldest, but used just now
        report = evict_to(store, 6 * 100, batch=3)  # batches smaller than the work: several rounds
        assert [item.name for item in report.removed] == names[1:5]
        left = {path.parent.name for path in store.iter_crate_files()}
        assert left == {names[0], *names[5:]}
        assert not (store.crates_dir / names[1]).exists()  # emptied folders go too
        assert store.ledger.totals() == on_disk(store) == (600, 6)
        assert store.get_crate_meta(names[1], "1.0.0") is None
    finally:
        store.close()


async def test_the_server_evicts_to_the_low_water_mark(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    versions = [registry.add_crate(f"lw{i}", "1.0.0", pad_to=20_000) for i in range(10)]
    largest = max(len(cv.data) for cv in versions)
    max_size = 8 * largest
    client = await mirror_factory(cache__max_size=max_size)
    store = store_of(client)
    for cv in versions[:8]:
        response = await client.get(crate_url(cv.name, cv.vers))
        assert response.status == 200 and await response.read() == cv.data
    assert store.crate_bytes() <= max_size  # at most max_size: nothing evicted yet

    crates = client.app[MIRROR].default.crates if client.app is not None else None
    assert crates is not None and crates._eviction is None

    response = await client.get(crate_url("lw8", "1.0.0"))  # past max_size: eviction starts
    assert response.status == 200 and await response.read() == versions[8].data
    assert crates._eviction is not None
    await asyncio.wait_for(crates._eviction, EVENT_TIMEOUT)
    # Not merely under max_size: down to LOW_WATER of it (two crates went for one that came).
    assert on_disk(store)[0] == store.crate_bytes() <= LOW_WATER * max_size
    assert {path.parent.name for path in store.iter_crate_files()} == {f"lw{i}" for i in range(2, 9)}

    evicted_by = crates._eviction
    response = await client.get(crate_url("lw9", "1.0.0"))  # room left: no eviction this time
    assert response.status == 200 and await response.read() == versions[9].data
    assert crates._eviction is evicted_by and on_disk(store)[1] == 8


CRASH_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from cratemirror.fleet.storage.disk import Store

    store = Store(Path(sys.argv[1]))
    marked = store.ledger.mark_evicting(store.ledger.oldest(int(sys.argv[2])))
    for row in marked[: len(marked) // 2]:  # half the files gone, no row dropped yet
        store.crate_path(row.name, row.version).unlink()
    print(len(marked), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


async def test_totals_are_exact_after_a_kill_mid_eviction(tmp_path: Path) -> None:
    cache = seeded_cache(tmp_path / "cache", 40)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH_CHILD, str(cache), "20", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(child.communicate(), EVENT_TIMEOUT)
    assert child.returncode == -9 and out.strip() == b"20"

    store = Store(cache)
    try:
        # Mid-eviction the marked rows have left the totals while half their files are still there.
        assert store.ledger.totals() == (20 * 100, 20)
        assert on_disk(store) == (30 * 100, 30)
        assert store.settle() == 20  # what a restart does: a few rows, no walk
        assert store.ledger.totals() == on_disk(store) == (30 * 100, 30)
        assert store.settle() == 0
        # The surviving marked files are whole crates again: served and evictable as before.
        kept = [row for row in store.iter_ledger() if row.name < "seed00020"]
        assert len(kept) == 10 and all(store.crate_path(row.name, "1.0.0").exists() for row in kept)
    finally:
        store.close()


COMMIT_CRASH_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from cratemirror.fleet.storage.disk import Store

    store = Store(Path(sys.argv[1]))
    for name, rename in (("renamed", True), ("unrenamed", False)):
        path = store.crate_path(name, "1.0.0")
        store.ledger.begin_commit(name, "1.0.0", "0" * 64, 7, 1.0)
        if rename:
            path.parent.mkdir(parents=True)
            path.write_bytes(b"renamed")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


async def test_totals_are_exact_after_a_kill_mid_commit(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    Store(cache).close()
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", COMMIT_CRASH_CHILD, str(cache))
    await asyncio.wait_for(child.wait(), EVENT_TIMEOUT)
    assert child.returncode == -9
    store = Store(cache)
    try:
        assert store.ledger.totals() == (0, 0)  # neither commit finished
        assert store.settle() == 2
        assert store.ledger.totals() == on_disk(store) == (7, 1)
        assert store.get_crate_meta("renamed", "1.0.0") is not None
        assert store.get_crate_meta("unrenamed", "1.0.0") is None
    finally:
        store.close()


async def test_a_miss_completes_while_thousands_are_evicted(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    cache = seeded_cache(tmp_path / "cache", 3000)
    client = await mirror_factory(cache_dir=cache)
    store = store_of(client)
    # A name whose fill lock shares a stripe with the key an eviction once held for its whole run.
    name = next(
        f"newcomer{i}"
        for i in range(1_000_000)
        if store.key_locks.stripe(f"crate:newcomer{i}/1.0.0") == store.key_locks.stripe("evict")
    )
    cv = registry.add_crate(name, "1.0.0")
    loop = asyncio.get_running_loop()
    first_batch = asyncio.Event()
    miss_done = threading.Event()
    batches = 0

    def after_batch(count: int, size: int) -> None:
        nonlocal batches
        batches += 1
        if batches == 1:
            loop.call_soon_threadsafe(first_batch.set)
            # The eviction stays in the middle of its run until the miss has been answered.
            assert miss_done.wait(EVENT_TIMEOUT), "the miss did not complete during the eviction"

    async def evict_everything() -> Any:
        async with store.eviction_lock():
            return await asyncio.to_thread(evict_to, store, 0, batch=100, on_batch=after_batch)

    eviction = asyncio.create_task(evict_everything())
    try:
        await asyncio.wait_for(first_batch.wait(), EVENT_TIMEOUT)
        started = time.monotonic()
        response = await asyncio.wait_for(client.get(crate_url(name, "1.0.0")), EVENT_TIMEOUT)
        assert response.status == 200 and response.headers["X-Cache"] == "MISS"
        assert await response.read() == cv.data
        assert not eviction.done()  # answered while the eviction was still running
        elapsed = time.monotonic() - started
    finally:
        miss_done.set()
    report = await asyncio.wait_for(eviction, EVENT_TIMEOUT)
    assert report.removed_count >= 3000 and batches >= 30
    assert elapsed < EVENT_TIMEOUT
    assert store.ledger.totals() == on_disk(store)


async def test_metrics_equal_a_real_count(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    versions = [registry.add_crate(f"count{i}", "1.0.0", pad_to=5_000 + i) for i in range(6)]
    client: TestClient[Any, Any] = await mirror_factory()
    store = store_of(client)
    for cv in versions:
        response = await client.get(crate_url(cv.name, cv.vers))
        assert response.status == 200 and await response.read() == cv.data
    async with store.eviction_lock():
        await asyncio.to_thread(evict_to, store, store.crate_bytes() - 1)  # one (the oldest) goes
    text = await (await client.get("/metrics")).text()
    size, files = on_disk(store)
    assert files == 5
    assert metric_value(text, "cratemirror_cache_size_bytes", kind="crate") == size
    assert metric_value(text, "cratemirror_cache_entries", kind="crate") == files
    index_keys = [key for key in store.meta.iterkeys() if str(key).startswith("index:")]
    assert metric_value(text, "cratemirror_cache_entries", kind="index") == len(index_keys) == 6


def test_a_cache_from_before_the_ledger_is_carried_over_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = Store(cache)  # lay out the old way: checksums in diskcache, no crates.sqlite
    data = {"kept": b"k" * 300, "gone": b"g" * 200}
    for name, body in data.items():
        meta = CrateMeta(name, "1.0.0", hashlib.sha256(body).hexdigest(), len(body), 1_000.0)
        store.meta.set(f"{CRATE_PREFIX}{name}/1.0.0", meta)
    store.crate_path("kept", "1.0.0").parent.mkdir(parents=True)
    store.crate_path("kept", "1.0.0").write_bytes(data["kept"])  # "gone" lost its file meanwhile
    store.close()
    (cache / LEDGER_FILE).unlink()

    store = Store(cache)
    try:
        assert store.ledger.totals() == on_disk(store) == (300, 1)
        kept = store.get_crate_meta("kept", "1.0.0")
        assert kept is not None and kept.sha256 == hashlib.sha256(data["kept"]).hexdigest()
        assert store.get_crate_meta("gone", "1.0.0") is None
        assert not [key for key in store.meta.iterkeys() if str(key).startswith(CRATE_PREFIX)]
    finally:
        store.close()
