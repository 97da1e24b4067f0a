"""Issue 9 item 4: idle, slowloris and non-reading clients cannot hold connections, their number is
capped, and the open-file limit is raised. Real mirror processes, raw sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.fake_upstream import make_crate_tarball
from tests.hostile_upstream import HostileUpstream, index_line, sha256
from tests.mirror_process import MirrorProcess, wait_until

BIG = make_crate_tarball("big", "1.0.0", pad_to=24 * 1024 * 1024)


def server_side_connections(port: int) -> set[int]:
    """Remote ports of the ESTABLISHED connections whose local end is `port` (the mirror's side)."""
    remotes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    remotes.add(int(remote.rsplit(":", 1)[1], 16))
    return remotes


@pytest.fixture
async def upstream() -> AsyncIterator[HostileUpstream]:
    async with HostileUpstream() as hostile:
        hostile.serve_bytes("/index/3/b/big", index_line("big", "1.0.0", sha256(BIG)) + b"\n")
        hostile.serve_bytes("/dl/big/1.0.0/download", BIG)
        yield hostile


@pytest.fixture
async def mirror(upstream: HostileUpstream, tmp_path: Path) -> AsyncIterator[MirrorProcess]:
    (tmp_path / "mirror.yaml").write_text("server:\n  idle_timeout: 1s\n  max_connections: 40\n")
    async with MirrorProcess(upstream.index_url, tmp_path / "cache", tmp_path, workers=1) as process:
        yield process


async def closed_by_server(mirror: MirrorProcess, client_port: int, what: str) -> None:
    async def gone() -> bool:
        return client_port not in server_side_connections(mirror.port)

    await wait_until(gone, what, timeout=10)


async def test_incomplete_request_head_and_idle_connections_are_closed(mirror: MirrorProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mirror.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished (slowloris)
    await writer.drain()
    _, idle_writer = await asyncio.open_connection("127.0.0.1", mirror.port)  # says nothing
    ports = [w.get_extra_info("sockname")[1] for w in (writer, idle_writer)]
    try:
        for port in ports:
            assert port in server_side_connections(mirror.port)
        for port in ports:
            await closed_by_server(mirror, port, "the silent connections to be closed")
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        for w in (writer, idle_writer):
            w.close()


async def test_a_client_that_reads_nothing_is_cut_off(mirror: MirrorProcess) -> None:
    # Cached first: the answer then goes out at once.
    url = mirror.url + "/api/v1/crates/big/1.0.0/download"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200 and sha256(await response.read()) == sha256(BIG)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", mirror.port))
    try:
        sock.sendall(b"GET /api/v1/crates/big/1.0.0/download HTTP/1.1\r\nHost: x\r\n\r\n")
        await closed_by_server(mirror, sock.getsockname()[1], "the stalled reader to be cut off")
    finally:
        sock.close()
    async with aiohttp.ClientSession() as session, session.get(mirror.url + "/healthz") as response:
        assert response.status == 200  # and the mirror still serves


async def test_connections_beyond_the_cap_close_the_oldest_idle_ones(mirror: MirrorProcess) -> None:
    idle = [socket.create_connection(("127.0.0.1", mirror.port)) for _ in range(60)]
    try:

        async def capped() -> bool:
            return len(server_side_connections(mirror.port)) <= 40

        await wait_until(capped, "the connection count to fall to server.max_connections")
        # A new client is served, not refused.
        async with aiohttp.ClientSession() as session, session.get(mirror.url + "/healthz") as response:
            assert response.status == 200
        newest = {sock.getsockname()[1] for sock in idle[-20:]}
        assert newest <= server_side_connections(mirror.port) | {0}  # the oldest went first
    finally:
        for sock in idle:
            sock.close()


async def test_the_open_file_limit_is_raised_to_the_hard_limit(
    upstream: HostileUpstream, tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 256)
    if hard != resource.RLIM_INFINITY and hard <= lowered:
        lowered = hard  # nothing to raise to on this machine; still check it is not lowered
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))  # the child inherits it
    try:
        process = MirrorProcess(upstream.index_url, tmp_path / "cache", tmp_path, workers=1)
        await process.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert process.proc is not None
        limits = await asyncio.to_thread(Path(f"/proc/{process.proc.pid}/limits").read_text)
        line = next(text for text in limits.splitlines() if text.startswith("Max open files"))
        in_force = line.split()[3]
        expected = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        assert in_force in (expected, str(1 << 20)), line
        assert os.getpid() != process.proc.pid
    finally:
        await process.stop()
