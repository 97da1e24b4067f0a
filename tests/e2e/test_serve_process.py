"""`python -m cratemirror serve` as a real process: several workers, one upstream fetch between them,
metrics summed over workers, a clean SIGTERM, and the command line's exit codes."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.fake_upstream import FakeRegistry
from tests.mirror_process import MirrorProcess, clean_env, free_port, metric_value, wait_until

CLIENTS = 30
WORKERS = 2
CLI_TIMEOUT = 60


@pytest.fixture
async def served(registry: FakeRegistry, tmp_path: Path) -> AsyncIterator[MirrorProcess]:
    registry.add_crate("serde", "1.0.0")
    registry.add_crate("serde", "1.0.1")
    registry.add_crate("Inflect", "0.1.0")
    mirror = MirrorProcess(registry.index_url, tmp_path / "cache", tmp_path, workers=WORKERS)
    await mirror.start()
    try:
        yield mirror
    finally:
        registry.gate = None  # never leave a worker parked on the fake while it stops
        await mirror.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # One connection per concurrent request, so the kernel spreads them over the workers.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with session.get(url) as response:
        return response.status, response.headers.get("X-Cache", ""), await response.read()


async def metrics(session: aiohttp.ClientSession, mirror: MirrorProcess) -> str:
    async with session.get(f"{mirror.url}/metrics") as response:
        assert response.status == 200
        return await response.text()


async def test_one_upstream_fetch_across_workers(
    registry: FakeRegistry, served: MirrorProcess, session: aiohttp.ClientSession
) -> None:
    cv = registry.get_version("serde", "1.0.0")
    url = f"{served.url}/api/v1/crates/serde/1.0.0/download"
    registry.gate = gate = asyncio.Event()
    tasks = [asyncio.create_task(fetch(session, url)) for _ in range(CLIENTS)]
    try:
        await asyncio.wait_for(registry.hold_started.wait(), timeout=30)

        # Every worker's first client waits for the fill (in its own process or on the other's lock);
        # the rest join it: with both workers reached, CLIENTS - WORKERS joiners.
        async def all_arrived() -> bool:
            text = await metrics(session, served)
            return (
                metric_value(text, "cratemirror_coalesced_requests_total", kind="crate") == CLIENTS - WORKERS
            )

        await wait_until(all_arrived, "every client to reach a worker and wait", timeout=20, interval=0.05)
        assert registry.held == 1
        assert not any(task.done() for task in tasks)
    finally:
        gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    assert [(status, body == cv.data) for status, _, body in results] == [(200, True)] * CLIENTS
    assert registry.count("/crates/serde/1.0.0/download") == 1
    assert registry.count("/index/se/rd/serde") == 1
    assert 1 <= registry.count("/index/config.json") <= WORKERS  # each worker learns the dl template
    assert registry.requests.total() == 2 + registry.count("/index/config.json")

    text = await metrics(session, served)
    miss = metric_value(text, "cratemirror_cache_requests_total", kind="crate", result="miss")
    hit = metric_value(text, "cratemirror_cache_requests_total", kind="crate", result="hit")
    # Misses == upstream fetches: the other worker's requests waited on the lock and read the stored
    # file, so they count as coalesced hits (the contract), not as a second miss.
    assert (miss, hit) == (registry.count("/crates/serde/1.0.0/download"), CLIENTS - 1)
    assert metric_value(text, "cratemirror_cache_requests_total", kind="crate", result="error") == 0
    assert metric_value(text, "cratemirror_coalesced_requests_total", kind="crate") == CLIENTS - 1

    # Now a hit in whichever worker answers.
    status, x_cache, body = await fetch(session, url)
    assert (status, x_cache, body == cv.data) == (200, "HIT", True)
    text = await metrics(session, served)
    assert metric_value(text, "cratemirror_cache_requests_total", kind="crate", result="hit") == hit + 1
    assert registry.requests.total() == 2 + registry.count("/index/config.json")


async def test_one_index_fetch_across_workers(
    registry: FakeRegistry, served: MirrorProcess, session: aiohttp.ClientSession
) -> None:
    url = f"{served.url}/index/in/fl/inflect"
    registry.delay = 1.5  # index requests are not gated: a slow upstream keeps the fetch in flight
    tasks = [asyncio.create_task(fetch(session, url)) for _ in range(CLIENTS)]
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    registry.delay = 0
    assert {(status, body) for status, _, body in results} == {(200, registry.index_file("Inflect"))}
    # The worker that fetched says MISS; the other one waited on its lock and read the stored copy.
    assert {x_cache for _, x_cache, _ in results} <= {"MISS", "HIT"}
    assert "MISS" in {x_cache for _, x_cache, _ in results}
    assert registry.count("/index/in/fl/inflect") == 1
    assert registry.requests.total() == 1

    text = await metrics(session, served)
    index_requests = metric_value(text, "cratemirror_cache_requests_total", kind="index")
    assert index_requests == CLIENTS
    # One fetch, one miss; everyone else joined it (in its worker, or by waiting on the lock).
    assert metric_value(text, "cratemirror_cache_requests_total", kind="index", result="miss") == 1
    assert metric_value(text, "cratemirror_cache_requests_total", kind="index", result="hit") == CLIENTS - 1
    assert metric_value(text, "cratemirror_coalesced_requests_total", kind="index") == CLIENTS - 1
    assert metric_value(text, "cratemirror_cache_requests_total", kind="index", result="error") == 0


async def test_metrics_sum_over_workers(
    registry: FakeRegistry, served: MirrorProcess, session: aiohttp.ClientSession
) -> None:
    """Sequential hits land on both workers (one connection each); the scrape, answered by one worker,
    counts them all."""
    url = f"{served.url}/index/se/rd/serde"
    assert (await fetch(session, url))[0] == 200
    for _ in range(CLIENTS - 1):
        status, x_cache, _ = await fetch(session, url)
        assert (status, x_cache) == (200, "HIT")
    assert registry.count("/index/se/rd/serde") == 1
    assert registry.requests.total() == 1
    for _ in range(4):  # whichever worker answers the scrape, the sums are the same
        text = await metrics(session, served)
        assert metric_value(text, "cratemirror_cache_requests_total", kind="index", result="miss") == 1
        assert (
            metric_value(text, "cratemirror_cache_requests_total", kind="index", result="hit") == CLIENTS - 1
        )
        assert metric_value(text, "cratemirror_request_duration_seconds_count", kind="index") == CLIENTS


async def test_sigterm_stops_cleanly(
    registry: FakeRegistry, served: MirrorProcess, session: aiohttp.ClientSession
) -> None:
    status, _, _ = await fetch(session, f"{served.url}/api/v1/crates/Inflect/0.1.0/download")
    assert status == 200
    assert registry.count("/crates/Inflect/0.1.0/download") == 1
    started = time.monotonic()
    code = await served.stop(timeout=20)
    elapsed = time.monotonic() - started
    assert code == 0, served.output()
    assert elapsed < 15, f"SIGTERM took {elapsed:.1f}s"
    assert not served.leftovers, f"processes outlived the supervisor:\n{served.output()}"
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch(session, f"{served.url}/healthz")
    assert list((served.cache_dir / "tmp").glob("*.part")) == []
    assert registry.requests.total() == 3


async def test_single_worker_process(
    registry: FakeRegistry, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    cv = registry.add_crate("z", "0.1.0")
    async with MirrorProcess(registry.index_url, tmp_path / "cache", tmp_path, workers=1) as mirror:
        status, _, body = await fetch(session, f"{mirror.url}/api/v1/crates/z/0.1.0/download")
        assert (status, body == cv.data) == (200, True)
        code = await mirror.stop()
    assert code == 0, mirror.output()
    assert not mirror.leftovers
    assert registry.count("/crates/z/0.1.0/download") == 1
    assert registry.requests.total() == 3


# ---- the command line ---------------------------------------------------------------------------------


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cratemirror", *args],
        cwd=cwd,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def test_bad_port_flag_exits_2(tmp_path: Path) -> None:
    result = run_cli(["serve", "--port", "70000", "--cache-dir", str(tmp_path / "cache")], tmp_path)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line
    assert "server.port: expected" in line
    assert "70000" in line
    assert not (tmp_path / "cache").exists()


def test_bad_config_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "mirror.yaml").write_text("cache:\n  max_size: lots\n")
    result = run_cli(["serve", "--port", str(free_port())], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith(
        "mirror.yaml: cache.max_size: expected a size like 20GiB, got 'lots'"
    )
    assert "Traceback" not in result.stderr


def test_config_flag_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "elsewhere.yaml"
    config.write_text("server:\n  workers: many\n")
    result = run_cli(["serve", "--config", str(config)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "elsewhere.yaml: server.workers: expected" in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"]])
def test_help_exits_0(tmp_path: Path, args: list[str]) -> None:
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    if args[0] == "serve":
        for flag in ("--config", "--host", "--port", "--workers", "--cache-dir", "--upstream", "--offline"):
            assert flag in result.stdout, flag


def test_port_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            ["serve", "--port", str(port), "--cache-dir", str(tmp_path / "cache"), "--workers", "2"], tmp_path
        )
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
