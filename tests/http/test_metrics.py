"""The contract's metrics: exact counts per cache result, counters that agree with each other and with
what the fake upstream saw, cache gauges exact at scrape time, and sums over worker processes that
survive a worker's death (a real `cratemirror serve --workers 2`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from cratemirror.metrics import KINDS, RESULTS, Metrics
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path
from tests.mirror_process import MirrorProcess, clean_env, listening_sockets, metric_value, wait_until

REQUESTS = "cratemirror_cache_requests_total"
UPSTREAM = "cratemirror_upstream_requests_total"


def dl(name: str, version: str) -> str:
    return f"/api/v1/crates/{name}/{version}/download"


def idx(name: str) -> str:
    return f"/index/{index_path(name)}"


async def scrape(mirror: TestClient[Any, Any]) -> str:
    response = await mirror.get("/metrics")
    assert response.status == 200
    return await response.text()


async def get(mirror: TestClient[Any, Any], path: str) -> tuple[int, str, bytes]:
    response = await mirror.get(path)
    return response.status, response.headers.get("X-Cache", ""), await response.read()


def results(text: str, kind: str) -> dict[str, float]:
    """Non-zero cache results of one kind."""
    counts = {result: metric_value(text, REQUESTS, kind=kind, result=result) for result in RESULTS}
    return {result: count for result, count in counts.items() if count}


def assert_counters_agree(text: str, sent: dict[str, int]) -> None:
    """Every client request is counted once, under exactly one result, and timed once."""
    for kind in KINDS:
        by_result = sum(metric_value(text, REQUESTS, kind=kind, result=result) for result in RESULTS)
        assert by_result == sent.get(kind, 0), kind
        assert metric_value(text, "cratemirror_request_duration_seconds_count", kind=kind) == by_result


# ---- one process: each result label ----------------------------------------------------------------


async def test_misses_then_hits_and_what_they_moved(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    alpha = registry.add_crate("alpha", "1.0.0")
    beta = registry.add_crate("beta", "1.0.0")
    mirror = await mirror_factory()
    for _ in range(3):
        status, _, body = await get(mirror, dl("beta", "1.0.0"))
        assert (status, body) == (200, beta.data)
    text = await scrape(mirror)
    # A crate served three times after one fetch; the index lookup behind it is not a client request.
    assert results(text, "crate") == {"miss": 1, "hit": 2}
    assert results(text, "index") == {}
    assert metric_value(text, "cratemirror_cache_entries", kind="crate") == 1
    assert metric_value(text, "cratemirror_cache_size_bytes", kind="crate") == len(beta.data)

    statuses = [await get(mirror, idx("alpha")) for _ in range(3)]
    assert [(status, x_cache) for status, x_cache, _ in statuses] == [
        (200, "MISS"),
        (200, "HIT"),
        (200, "HIT"),
    ]
    head = await mirror.head(dl("beta", "1.0.0"))
    assert head.status == 200 and head.headers["X-Cache"] == "HIT"
    text = await scrape(mirror)
    assert results(text, "index") == {"miss": 1, "hit": 2}
    assert results(text, "crate") == {"miss": 1, "hit": 3}
    assert_counters_agree(text, {"crate": 4, "index": 3})

    # Body bytes only (a HEAD sends none), and upstream bytes as received (the index came gzipped).
    assert metric_value(text, "cratemirror_bytes_served_total", kind="crate") == 3 * len(beta.data)
    assert metric_value(text, "cratemirror_bytes_served_total", kind="index") == 3 * len(
        registry.index_file("alpha")
    )
    assert metric_value(text, "cratemirror_upstream_bytes_total", kind="crate") == len(beta.data)
    assert metric_value(text, "cratemirror_upstream_bytes_total", kind="index") == len(
        registry.index_file("alpha")
    ) + len(registry.index_file("beta"))
    assert alpha.data  # alpha's tarball was never asked for
    assert registry.count("/crates/") == 1

    # Upstream requests by status agree with what the upstream saw.
    assert metric_value(text, UPSTREAM, kind="index", status="200") == 2
    assert metric_value(text, UPSTREAM, kind="crate", status="200") == 1
    assert (
        metric_value(text, UPSTREAM, kind="config", status="200") == registry.count("/index/config.json") == 1
    )
    assert metric_value(text, UPSTREAM) == registry.requests.total() == 4
    assert metric_value(text, "cratemirror_upstream_request_duration_seconds_count") == 4
    assert metric_value(text, "cratemirror_cache_entries", kind="index") == 2
    assert metric_value(text, "cratemirror_upstream_up") == 1
    assert metric_value(text, "cratemirror_checksum_failures_total") == 0
    assert metric_value(text, "cratemirror_coalesced_requests_total") == 0


async def test_revalidated(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    registry.add_crate("alpha", "1.0.0")
    mirror = await mirror_factory(cache__index_ttl=0)
    assert (await get(mirror, idx("alpha")))[:2] == (200, "MISS")
    assert (await get(mirror, idx("alpha")))[:2] == (200, "REVALIDATED")
    text = await scrape(mirror)
    assert results(text, "index") == {"miss": 1, "revalidated": 1}
    assert metric_value(text, UPSTREAM, kind="index", status="200") == 1
    assert metric_value(text, UPSTREAM, kind="index", status="304") == 1
    assert metric_value(text, "cratemirror_bytes_served_total", kind="index") == 2 * len(
        registry.index_file("alpha")
    )


async def test_stale_while_upstream_is_down(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    registry.add_crate("alpha", "1.0.0")
    mirror = await mirror_factory(cache__index_ttl=0)
    assert (await get(mirror, idx("alpha")))[:2] == (200, "MISS")
    registry.down = True
    assert (await get(mirror, idx("alpha")))[:2] == (200, "STALE")
    text = await scrape(mirror)
    assert results(text, "index") == {"miss": 1, "stale": 1}
    # Each attempt that met a cut connection is one `error` (aiohttp may resend on a reset keep-alive
    # connection, so the upstream can see more requests than attempts).
    errors = metric_value(text, UPSTREAM, kind="index", status="error")
    assert 1 <= errors <= registry.count(idx("alpha")) - 1


async def test_negative_then_remembered(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    mirror = await mirror_factory()
    assert (await get(mirror, idx("nosuch")))[:2] == (404, "MISS")
    assert (await get(mirror, idx("nosuch")))[:2] == (404, "HIT")
    text = await scrape(mirror)
    assert results(text, "index") == {"miss": 1, "negative": 1}
    assert metric_value(text, UPSTREAM, kind="index", status="404") == 1
    assert metric_value(text, "cratemirror_bytes_served_total") == 0  # error bodies are not content
    assert metric_value(text, "cratemirror_cache_entries", kind="index") == 1


async def test_upstream_error_without_a_copy(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    registry.add_crate("alpha", "1.0.0")
    mirror = await mirror_factory()
    registry.status_override = 500
    assert (await get(mirror, idx("alpha")))[0] == 502
    text = await scrape(mirror)
    assert results(text, "index") == {"error": 1}
    assert metric_value(text, UPSTREAM, kind="index", status="500") == registry.count(idx("alpha")) == 2
    assert metric_value(text, "cratemirror_upstream_up") == 1  # two failures are not "down" yet
    assert (await get(mirror, idx("alpha")))[0] == 502
    text = await scrape(mirror)
    assert results(text, "index") == {"error": 2}
    assert metric_value(text, UPSTREAM, kind="index", status="500") == registry.count(idx("alpha"))
    assert metric_value(text, "cratemirror_upstream_up") == 0
    assert_counters_agree(text, {"index": 2})


async def test_upstream_timeout(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    registry.add_crate("alpha", "1.0.0")
    mirror = await mirror_factory(upstream__timeout=0.3, upstream__retries=0)
    registry.delay = 30.0  # woken when the registry stops
    assert (await get(mirror, idx("alpha")))[0] == 504
    text = await scrape(mirror)
    assert results(text, "index") == {"error": 1}
    assert metric_value(text, UPSTREAM, kind="index", status="timeout") == 1
    assert metric_value(text, UPSTREAM) == 1


async def test_checksum_failure(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    registry.add_crate("alpha", "1.0.0")
    registry.corrupt_crates = True
    mirror = await mirror_factory()
    assert (await get(mirror, dl("alpha", "1.0.0")))[0] == 502
    text = await scrape(mirror)
    assert metric_value(text, "cratemirror_checksum_failures_total") == 1
    assert results(text, "crate") == {"error": 1}
    assert metric_value(text, "cratemirror_cache_entries", kind="crate") == 0
    assert metric_value(text, "cratemirror_cache_size_bytes", kind="crate") == 0
    assert metric_value(text, "cratemirror_bytes_served_total", kind="crate") == 0


async def test_coalesced(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    cv = registry.add_crate("alpha", "1.0.0")
    mirror = await mirror_factory()
    registry.gate = gate = asyncio.Event()
    first = asyncio.create_task(get(mirror, dl("alpha", "1.0.0")))
    second: asyncio.Task[tuple[int, str, bytes]] | None = None
    try:
        await asyncio.wait_for(registry.hold_started.wait(), timeout=10)
        second = asyncio.create_task(get(mirror, dl("alpha", "1.0.0")))

        async def joined() -> bool:
            return (
                metric_value(await scrape(mirror), "cratemirror_coalesced_requests_total", kind="crate") == 1
            )

        await wait_until(joined, "the second download to join the first one's fetch")
    finally:
        gate.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *([second] if second else [])), timeout=30)
    assert answers == [(200, "MISS", cv.data)] * 2
    text = await scrape(mirror)
    # One upstream fetch is one miss; the request that joined it is a hit, counted as coalesced.
    assert results(text, "crate") == {"miss": 1, "hit": 1}
    assert metric_value(text, UPSTREAM, kind="crate", status="200") == 1
    assert metric_value(text, "cratemirror_coalesced_requests_total", kind="index") == 0


# ---- several processes ------------------------------------------------------------------------------

CHILD = """
import sys
from cratemirror.metrics import Metrics
metrics = Metrics()
metrics.upstream_up.set(float(sys.argv[1]))
metrics.cache_size.labels("crate").set(float(sys.argv[2]))
metrics.cache_requests.labels("crate", "hit").inc()
"""


async def run_child(metrics_dir: Path, upstream_up: int, crate_bytes: int) -> int:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(upstream_up), str(crate_bytes),
        env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)),
    )  # fmt: skip
    assert await asyncio.wait_for(child.wait(), timeout=60) == 0
    return child.pid


async def test_a_dead_workers_gauges_drop_out_but_its_counts_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newest gauge value of a live worker wins: not a sum (one disk, one upstream), and not the
    value a dead worker wrote last (serve.py calls mark_process_dead when it replaces a worker)."""
    await run_child(tmp_path, upstream_up=0, crate_bytes=100)  # saw the upstream fail, then lives on
    newer = await run_child(tmp_path, upstream_up=1, crate_bytes=200)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    text = Metrics().render().decode()
    assert metric_value(text, "cratemirror_upstream_up") == 1
    assert metric_value(text, "cratemirror_cache_size_bytes", kind="crate") == 200
    mark_process_dead(newer, str(tmp_path))  # type: ignore[no-untyped-call]
    text = Metrics().render().decode()
    assert metric_value(text, "cratemirror_upstream_up") == 0
    assert metric_value(text, "cratemirror_cache_size_bytes", kind="crate") == 100
    assert metric_value(text, REQUESTS, kind="crate", result="hit") == 2


def samples(text: str) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def access_pids(log_text: str, paths: Iterable[str]) -> set[int]:
    wanted = set(paths)
    pids = set()
    for line in log_text.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "cratemirror.access" and record.get("path") in wanted:
                pids.add(record["pid"])
    return pids


async def test_two_workers_sum_and_survive_a_worker_death(registry: FakeRegistry, tmp_path: Path) -> None:
    beta = registry.add_crate("beta", "1.0.0")
    registry.add_crate("alpha", "1.0.0")
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "mirror.yaml").write_text("logging:\n  format: json\n")  # access lines carry the pid
    plan = [
        ("config", "/index/config.json", 2),
        ("index", idx("alpha"), 3),
        ("crate", dl("beta", "1.0.0"), 3),
        ("index", idx("nosuch"), 2),
    ]
    served: dict[str, int] = {}
    sent: dict[str, int] = {}
    async with MirrorProcess(registry.index_url, tmp_path / "cache", workdir, workers=2) as mirror:
        # A new connection per request, so the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for kind, path, times in plan:
                for _ in range(times):
                    async with session.get(mirror.url + path) as response:
                        body = await response.read()
                    sent[kind] = sent.get(kind, 0) + 1
                    if response.status == 200:
                        served[kind] = served.get(kind, 0) + len(body)
            async with session.get(mirror.url + "/metrics") as response:
                text = await response.text()

            assert results(text, "config") == {"hit": 2}
            assert results(text, "index") == {"miss": 2, "hit": 2, "negative": 1}
            assert results(text, "crate") == {"miss": 1, "hit": 2}
            assert_counters_agree(text, sent)
            for kind in KINDS:
                assert metric_value(text, "cratemirror_bytes_served_total", kind=kind) == served.get(kind, 0)
            assert metric_value(text, "cratemirror_upstream_bytes_total", kind="crate") == len(beta.data)
            assert (
                registry.count(idx("alpha"))
                == registry.count(idx("beta"))
                == registry.count(idx("nosuch"))
                == 1
            )
            assert metric_value(text, UPSTREAM, kind="index", status="200") == 2
            assert metric_value(text, UPSTREAM, kind="index", status="404") == 1
            assert metric_value(text, UPSTREAM, kind="crate", status="200") == 1
            assert metric_value(text, UPSTREAM) == registry.requests.total()
            # One disk: gauges are its state, exact right after the fill (not summed over workers).
            assert metric_value(text, "cratemirror_cache_entries", kind="crate") == 1
            assert metric_value(text, "cratemirror_cache_size_bytes", kind="crate") == len(beta.data)
            assert metric_value(text, "cratemirror_cache_entries", kind="index") == 3
            assert metric_value(text, "cratemirror_upstream_up") == 1

            # Access lines are batched (written within 0.1 s), so wait for them rather than read once.
            async def both_workers_logged() -> bool:
                return len(access_pids(mirror.output(), [path for _, path, _ in plan])) == 2

            await wait_until(both_workers_logged, "access lines from both workers")
            pids = access_pids(mirror.output(), [path for _, path, _ in plan])

            # A worker dies: its counts stay in the sums, its replacement adds nothing until it serves.
            os.kill(sorted(pids)[0], signal.SIGKILL)

            async def replaced() -> bool:
                return "starting another" in mirror.output() and listening_sockets(mirror.port) >= 2

            await wait_until(replaced, "the supervisor to replace the killed worker", timeout=30)
            for _ in range(4):  # whichever worker answers, the figures are the same
                async with session.get(mirror.url + "/metrics") as response:
                    assert samples(await response.text()) == samples(text)
        assert await mirror.stop() == 0


async def test_the_configured_cache_bound_is_a_gauge(mirror_factory: MirrorFactory) -> None:
    """cache.max_size and toolchains.max_size as cratemirror_cache_max_size_bytes{kind}: what the alert
    compares each kind's size with."""
    mirror = await mirror_factory(cache__max_size=5 * 1024**3, toolchains__max_size=7 * 1024**3)
    text = await scrape(mirror)
    assert metric_value(text, "cratemirror_cache_max_size_bytes", kind="crate") == 5 * 1024**3
    assert metric_value(text, "cratemirror_cache_max_size_bytes", kind="toolchain") == 7 * 1024**3
