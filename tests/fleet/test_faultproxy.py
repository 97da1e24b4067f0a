"""tests/faultproxy.py does what the fault tests rely on: pass, delay, black-hole and reset, switched at
runtime, against a real echo server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tests.faultproxy import FaultProxy, Mode

pytestmark = pytest.mark.fleet


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def round_trip(port: int, timeout: float = 2.0) -> bytes:  # noqa: ASYNC109 - the bound is the point
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"ping")
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(4), timeout)
    finally:
        writer.transport.abort()


async def test_pass_latency_blackhole_reset_and_back() -> None:
    async with echo_server() as port, FaultProxy("127.0.0.1", port) as proxy:
        assert await round_trip(proxy.port) == b"ping"

        proxy.set(Mode.LATENCY, 0.2)
        started = time.monotonic()
        assert await round_trip(proxy.port) == b"ping"
        assert time.monotonic() - started >= 0.4  # the connection, then each of the two chunks

        # An open connection goes silent too when the hole opens.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        proxy.set(Mode.BLACKHOLE)
        writer.write(b"ping")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.5)
        with pytest.raises(TimeoutError):
            await round_trip(proxy.port, timeout=0.5)  # accepted, never answered

        proxy.set(Mode.RESET)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await reader.readexactly(4)  # the held connection is reset now
        writer.transport.abort()
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await round_trip(proxy.port)

        proxy.set(Mode.PASS)
        assert await round_trip(proxy.port) == b"ping"
        assert proxy.accepted == 6
