"""A client that goes away mid-answer is routine (a cancelled cargo, a front that gave up on a replica):
it costs at most an access line, never an ERROR with a traceback ("Cannot write to closing transport")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.fake_upstream import FakeRegistry
from tests.mirror_process import MirrorProcess, wait_until

REQUEST = b"GET /api/v1/crates/big/1.0.0/download HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def leave_mid_body(port: int, before: asyncio.Event | None = None) -> None:
    """Ask for the crate, read its head and 1 KiB of body, and reset the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(REQUEST)
        await writer.drain()
        if before is not None:
            before.set()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=20)
        assert head.startswith(b"HTTP/1.1 200"), head
        await asyncio.wait_for(reader.readexactly(1024), timeout=20)
    finally:
        writer.transport.abort()


@pytest.mark.parametrize("answer", ["a fill", "a cached crate"])
async def test_a_client_gone_mid_body_leaves_no_traceback(
    registry: FakeRegistry, tmp_path: Path, answer: str
) -> None:
    registry.add_crate("big", "1.0.0", pad_to=32 * 1024 * 1024)
    mirror = MirrorProcess(registry.index_url, tmp_path / "cache", tmp_path, workers=1)
    async with mirror:
        crates = mirror.cache_dir / "crates"

        async def stored() -> bool:
            return crates.exists() and any(crates.rglob("*.crate"))

        if answer == "a cached crate":
            await leave_mid_body(mirror.port)  # the fill goes on without its client
            await wait_until(stored, "the crate to be stored", timeout=20, interval=0.05)
            for _ in range(3):
                await leave_mid_body(mirror.port)
        else:
            await leave_mid_body(mirror.port)
            await wait_until(stored, "the fill to finish for the next client", timeout=20, interval=0.05)
        # Whatever a worker logs about it has reached the log by the time it answers the next request.
        reader, writer = await asyncio.open_connection("127.0.0.1", mirror.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), timeout=10)).startswith(b"HTTP/1.1 200")
        writer.close()
    output = mirror.output()
    assert "Traceback" not in output and "Cannot write to closing transport" not in output, output
    assert "Error handling request" not in output, output
    assert registry.count("/crates/big/1.0.0/download") == 1
