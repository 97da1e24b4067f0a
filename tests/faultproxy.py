"""A fault-injection TCP proxy for the tests (holds no tests itself).

`FaultProxy(host, port)` listens on a free loopback port and forwards every connection to host:port.
Its `mode` is switched at runtime, between two requests or in the middle of one:

- `PASS`: bytes flow both ways unchanged.
- `LATENCY`: as PASS, but each new connection and each chunk forwarded waits `latency` seconds first.
- `BLACKHOLE`: connections are accepted and never answered; a connection open when the hole opens stops
  forwarding at its next chunk and stays silent until its client gives up (a partition: nothing is
  refused, nothing arrives). Connections made after the mode goes back to PASS work again.
- `RESET`: every open connection and every new one is closed with a TCP RST.

Bounded: at most `max_connections` at once (beyond that a new one is reset), chunks of 64 KiB, and
`stop()` aborts whatever is still open. Use it as `async with FaultProxy(...) as proxy:`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from enum import Enum
from typing import Self

CHUNK = 64 * 1024
MAX_CONNECTIONS = 512


class Mode(Enum):
    PASS = "pass"
    LATENCY = "latency"
    BLACKHOLE = "blackhole"
    RESET = "reset"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its connection to the target."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.target: asyncio.StreamWriter | None = None
        self.held = False  # black-holed: never forwards again

    def abort(self, reset: bool) -> None:
        for writer in (self.client, self.target):
            if writer is not None:
                if reset:
                    _reset(writer)
                else:
                    writer.transport.abort()


class FaultProxy:
    def __init__(self, host: str, port: int, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.target_host = host
        self.target_port = port
        self.max_connections = max_connections
        self.mode = Mode.PASS
        self.latency = 0.0
        self.port = 0
        self.accepted = 0  # connections accepted since start, for the tests' assertions
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: Mode, latency: float = 0.0) -> None:
        """Switch the fault; RESET also resets every connection open now."""
        self.mode = mode
        self.latency = latency
        if mode is Mode.RESET:
            for link in list(self._links):
                link.abort(reset=True)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            link.abort(reset=False)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link = _Link(writer)
        self._links.add(link)
        self.accepted += 1
        try:
            await self._serve(link, reader)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._links.discard(link)
            self._tasks.discard(task)
            link.abort(reset=False)

    async def _serve(self, link: _Link, reader: asyncio.StreamReader) -> None:
        if self.mode is Mode.RESET or len(self._links) > self.max_connections:
            link.abort(reset=True)
            return
        if self.mode is Mode.BLACKHOLE:
            link.held = True
            await self._drain_silently(reader)
            return
        if self.mode is Mode.LATENCY:
            await asyncio.sleep(self.latency)
        target_reader, link.target = await asyncio.open_connection(self.target_host, self.target_port)
        # Either side failing (a reset, an abort) ends the link; the finally of _accept closes both.
        await asyncio.gather(
            self._pump(link, reader, link.target),
            self._pump(link, target_reader, link.client),
            return_exceptions=True,
        )

    async def _pump(self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while chunk := await source.read(CHUNK):
            if self.mode is Mode.BLACKHOLE or link.held:
                link.held = True
                await self._drain_silently(source)
                return
            if self.mode is Mode.LATENCY:
                await asyncio.sleep(self.latency)
            sink.write(chunk)
            await sink.drain()
        if link.held:
            return
        with contextlib.suppress(OSError):
            if sink.can_write_eof():
                sink.write_eof()

    @staticmethod
    async def _drain_silently(source: asyncio.StreamReader) -> None:
        """Read and drop what arrives, until the peer closes (or stop() aborts the connection)."""
        while await source.read(CHUNK):
            pass
