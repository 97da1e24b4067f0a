"""kill -9 of a real `cratemirror serve` process: mid-download (a partial temp file is left, cleaned at
the next start, and the crate is fetched anew) and right after a crate completed (it survives)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.fake_upstream import FakeRegistry
from tests.mirror_process import MirrorProcess, wait_until


def crate_path(name: str, version: str) -> str:
    return f"/api/v1/crates/{name}/{version}/download"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        yield client


def new_mirror(registry: FakeRegistry, tmp_path: Path, run: int) -> MirrorProcess:
    workdir = tmp_path / f"run{run}"  # own log per run
    workdir.mkdir()
    return MirrorProcess(registry.index_url, tmp_path / "cache", workdir, workers=1)


async def kill_9(mirror: MirrorProcess) -> None:
    proc = mirror.proc
    assert proc is not None and proc.returncode is None
    os.killpg(proc.pid, signal.SIGKILL)
    assert await mirror.stop() == -signal.SIGKILL


async def fetch(session: aiohttp.ClientSession, mirror: MirrorProcess, name: str) -> tuple[bytes, str]:
    async with session.get(mirror.url + crate_path(name, "1.0.0")) as response:
        assert response.status == 200, await response.text()
        return await response.read(), response.headers["X-Cache"]


async def test_kill_9_mid_download_leaves_a_temp_file_that_the_next_start_removes(
    registry: FakeRegistry, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    done = registry.add_crate("done", "1.0.0")
    big = registry.add_crate("big", "1.0.0", pad_to=4 * 1024 * 1024)
    tmp_dir = tmp_path / "cache" / "tmp"

    first = new_mirror(registry, tmp_path, 1)
    await first.start()
    assert first.proc is not None
    pid = first.proc.pid  # with one worker, the process that writes the temp files
    try:
        assert await fetch(session, first, "done") == (done.data, "MISS")
        registry.stall_after_bytes = 1024 * 1024  # the download hangs with a partial temp file
        download = asyncio.ensure_future(fetch(session, first, "big"))

        async def partial_written() -> bool:
            return any(part.stat().st_size > 0 for part in tmp_dir.glob("*.part"))

        await wait_until(partial_written, "a partial .part temp file")
        await kill_9(first)
        with contextlib.suppress(aiohttp.ClientError, AssertionError):
            await download
    finally:
        await first.stop()
    leftovers = list(tmp_dir.glob("*.part"))
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f"{pid}-"), leftovers
    assert not (tmp_path / "cache" / "crates" / "big").exists()

    registry.stall_after_bytes = None
    registry.reset_counts()
    async with new_mirror(registry, tmp_path, 2) as second:
        assert not leftovers[0].exists()  # removed at start: its process is dead
        assert await fetch(session, second, "big") == (big.data, "MISS")
        assert registry.count("/crates/big/") == 1
        assert await fetch(session, second, "done") == (done.data, "HIT")
        assert registry.count("/crates/done/") == 0
    assert list(tmp_dir.glob("*.part")) == []


async def test_kill_9_right_after_a_crate_completed_keeps_it(
    registry: FakeRegistry, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    small = registry.add_crate("small", "1.0.0")
    large = registry.add_crate("large", "1.0.0", pad_to=5 * 1024 * 1024)  # streamed while it arrives

    first = new_mirror(registry, tmp_path, 1)
    await first.start()
    try:
        assert await fetch(session, first, "small") == (small.data, "MISS")
        assert await fetch(session, first, "large") == (large.data, "MISS")
        await kill_9(first)  # at once: no graceful shutdown, no chance to flush anything later
    finally:
        await first.stop()

    registry.reset_counts()
    async with new_mirror(registry, tmp_path, 2) as second:
        assert await fetch(session, second, "small") == (small.data, "HIT")
        assert await fetch(session, second, "large") == (large.data, "HIT")
    assert sum(registry.requests.values()) == 0
