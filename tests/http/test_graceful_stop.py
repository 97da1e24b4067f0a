"""SIGTERM on a real `cratemirror serve`: it stops accepting at once, lets the answers in flight finish
within server.shutdown_timeout, exits 0 and logs one line saying so."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from cratemirror.config.schema import ServerConfig
from cratemirror.server.serve import WORKER_EXIT_GRACE
from tests.fake_upstream import FakeRegistry
from tests.mirror_process import MirrorProcess, listening_sockets, wait_until

DOWNLOAD = "/api/v1/crates/slow/1.0.0/download"


async def start_slow_download(
    registry: FakeRegistry, mirror: MirrorProcess, session: aiohttp.ClientSession
) -> asyncio.Task[tuple[int, bytes]]:
    """A download whose upstream answer is parked on the registry's gate: in flight in the mirror."""

    async def download() -> tuple[int, bytes]:
        async with session.get(f"{mirror.url}{DOWNLOAD}") as response:
            return response.status, await response.read()

    task = asyncio.create_task(download())

    async def parked() -> bool:
        return registry.held == 1

    await wait_until(parked, "the download to be parked upstream", timeout=10)
    return task


async def stopped_accepting(mirror: MirrorProcess) -> None:
    async def closed() -> bool:
        return listening_sockets(mirror.port) == 0

    await wait_until(closed, "the mirror to close its listening sockets", timeout=10)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_finishes_the_answers_in_flight(
    registry: FakeRegistry, tmp_path: Path, workers: int
) -> None:
    data = registry.add_crate("slow", "1.0.0").data
    registry.gate = gate = asyncio.Event()
    async with (
        MirrorProcess(registry.index_url, tmp_path / "cache", tmp_path, workers=workers) as mirror,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
    ):
        in_flight = await start_slow_download(registry, mirror, session)
        assert mirror.proc is not None
        mirror.proc.send_signal(signal.SIGTERM)
        await stopped_accepting(mirror)
        with pytest.raises(aiohttp.ClientConnectionError):  # a new client is refused ...
            async with aiohttp.ClientSession() as fresh, fresh.get(f"{mirror.url}/healthz"):
                pass
        assert mirror.proc.returncode is None  # ... while the answer in flight is still being made
        gate.set()
        status, body = await in_flight
        assert (status, body) == (200, data)
        code = await asyncio.wait_for(mirror.proc.wait(), timeout=15)
        assert code == 0, mirror.output()
    stops = [line for line in mirror.output().splitlines() if "stopped on SIGTERM" in line]
    assert len(stops) == 1, mirror.output()
    assert "answers in flight finished" in stops[0]


async def test_answers_still_in_flight_at_the_timeout_are_cut_off(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    registry.add_crate("slow", "1.0.0")
    registry.gate = gate = asyncio.Event()
    mirror = MirrorProcess(
        registry.index_url, tmp_path / "cache", tmp_path, workers=1,
        env={"CRATEMIRROR_SERVER_SHUTDOWN_TIMEOUT": "1s"},
    )  # fmt: skip
    try:
        async with (
            mirror,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        ):
            in_flight = await start_slow_download(registry, mirror, session)
            assert mirror.proc is not None
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            mirror.proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(mirror.proc.wait(), timeout=10)  # never waits for the gate
            assert code == 0, mirror.output()
            assert 1.0 <= loop.time() - signalled < 5.0
            status_or_error = await asyncio.gather(in_flight, return_exceptions=True)
            assert isinstance(status_or_error[0], aiohttp.ClientError), status_or_error
    finally:
        gate.set()
    stops = [line for line in mirror.output().splitlines() if "stopped on SIGTERM" in line]
    assert len(stops) == 1 and "cut off" in stops[0], mirror.output()


def test_the_deploy_files_wait_longer_than_a_graceful_stop() -> None:
    """systemd, Kubernetes and compose must not SIGKILL a mirror that is still finishing its answers."""
    repo = Path(__file__).resolve().parents[2]
    needed = ServerConfig().shutdown_timeout + WORKER_EXIT_GRACE
    found = {
        "deploy/systemd/cratemirror.service": r"TimeoutStopSec=(\d+)s",
        "deploy/kubernetes/statefulset.yaml": r"terminationGracePeriodSeconds: (\d+)",
        "deploy/kubernetes/fleet/deployment.yaml": r"terminationGracePeriodSeconds: (\d+)",
        "deploy/docker-compose.yml": r"stop_grace_period: (\d+)s",
        "deploy/compose/docker-compose.fleet.yml": r"stop_grace_period: (\d+)s",
    }
    for name, pattern in found.items():
        match = re.search(pattern, (repo / name).read_text(encoding="utf-8"))
        assert match is not None, name
        assert int(match.group(1)) > needed, name
