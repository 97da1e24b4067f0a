"""`serve` says it is ready (the "serving on" line, `--ready-file`, sd_notify READY=1) only once every
worker accepts connections, and withdraws it (file removed, STOPPING=1) when it stops."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_upstream import FakeRegistry
from tests.mirror_process import MirrorProcess, free_port, listening_sockets
from tests.tools_support import run_cli

SERVING_ON = "cratemirror serving on"
WATCH_SECONDS = 40.0


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """What systemd listens on for Type=notify: a datagram socket named by NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def announced(ready_file: Path) -> bool:
    """The file this run writes (the supervisor's pid), not the one a killed run left."""
    with contextlib.suppress(FileNotFoundError):
        return ready_file.read_text().strip().isdigit()
    return False


async def watch(mirror: MirrorProcess, ready_file: Path) -> dict[str, int]:
    """Listening workers at the moment the log line and the ready file first appear (a tight, bounded
    poll: the point is to catch an announcement that comes too early)."""
    seen: dict[str, int] = {}
    deadline = time.monotonic() + WATCH_SECONDS
    while len(seen) < 2 and time.monotonic() < deadline:
        if "line" not in seen and SERVING_ON in mirror.output():
            seen["line"] = listening_sockets(mirror.port)
        if "file" not in seen and announced(ready_file):
            seen["file"] = listening_sockets(mirror.port)
        await asyncio.sleep(0.005)
    return seen


@pytest.mark.parametrize("workers", [1, 2])
async def test_ready_only_when_every_worker_listens(
    registry: FakeRegistry, tmp_path: Path, notify_socket: socket.socket, workers: int
) -> None:
    ready_file = tmp_path / "ready"
    ready_file.write_text("left by a killed run\n")  # must not count as ready
    mirror = MirrorProcess(
        registry.index_url, tmp_path / "cache", tmp_path, workers=workers,
        extra_args=["--ready-file", str(ready_file)],
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")},
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    starting = asyncio.create_task(mirror.start())
    try:
        await asyncio.sleep(0)  # start() has picked the port
        seen = await watch(mirror, ready_file)
        datagram = await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), timeout=WATCH_SECONDS)
        await asyncio.wait_for(starting, timeout=WATCH_SECONDS)
        assert seen == {"line": workers, "file": workers}, mirror.output()
        assert datagram.decode().splitlines()[0] == "READY=1"
        assert mirror.output().count(SERVING_ON) == 1
        assert ready_file.read_text().strip().isdigit()  # the supervisor's pid, not the old text
    finally:
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        code = await mirror.stop()
    assert code == 0, mirror.output()
    assert not ready_file.exists()
    stopping = await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), timeout=10)
    assert stopping == b"STOPPING=1"


async def test_ready_file_in_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    result = await run_cli(
        "serve", "--port", str(free_port()), "--ready-file", str(tmp_path / "no" / "ready"), cwd=tmp_path
    )
    assert result.code == 2
    assert "--ready-file: expected a path in an existing directory" in result.stderr
