"""The kernel's sendfile for a large stored crate, also under uvloop (whose event loop has no
`loop.sendfile`: without this, every MiB went through a Python read and a transport write).

Once the response headers have left (the transport's buffer is empty), the file goes straight to the
client's socket with `os.sendfile`, on a duplicate of the socket's descriptor: uvloop refuses to watch
the descriptor its transport owns, and the duplicate is watched for writability only while the socket
is full. Not for TLS (the bytes must pass through the TLS layer): there the caller copies in chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any, Protocol

WAIT_SLICE = 1.0  # seconds between looks at whether the connection was closed (the guard may abort it)


class Transport(Protocol):
    """What is used of a transport (uvloop's are not asyncio.WriteTransport subclasses)."""

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def get_write_buffer_size(self) -> int: ...
    def is_closing(self) -> bool: ...


@contextlib.contextmanager
def corked(transport: Transport | None) -> Iterator[None]:
    """TCP_CORK for the length of a large answer, as nginx's `tcp_nopush`: the headers and the file's
    first bytes leave in full segments, not the headers alone first (aiohttp sets TCP_NODELAY). On
    loopback this took warm 3 MiB hits from 2,200-2,600 to 2,830-2,850 MB/s (0.85-0.90x nginx to
    0.94-0.96x). Released when the body is out, so its last partial segment leaves at once."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or not hasattr(socket, "TCP_CORK"):
        yield
        return
    # uvloop's socket object raises ValueError, not OSError, once the connection is closed.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    except (OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):  # the client may have left meanwhile
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


def can_sendfile(transport: Transport) -> bool:
    return (
        hasattr(os, "sendfile")
        and transport.get_extra_info("sslcontext") is None
        and transport.get_extra_info("socket") is not None
    )


async def sendfile(transport: Transport, fd: int, size: int) -> bool:
    """Send `size` bytes of `fd` from offset 0. False (nothing sent) when the transport still holds
    unsent bytes: the caller writes through the transport instead. Raises ConnectionResetError when the
    client goes away (or the connection is closed) midway."""
    if transport.get_write_buffer_size() or transport.is_closing():
        return False
    sock = transport.get_extra_info("socket")
    out = os.dup(sock.fileno())
    writable = _Writable(asyncio.get_running_loop(), out, transport)
    try:
        offset = 0
        while offset < size:
            try:
                sent = os.sendfile(out, fd, offset, size - offset)
            except BlockingIOError:
                await writable.wait()
                continue
            except OSError as exc:  # EPIPE, ECONNRESET: the client left
                raise ConnectionResetError(str(exc)) from exc
            if sent == 0:
                raise ConnectionResetError("the file ended early or the client left")
            offset += sent
        return True
    finally:
        writable.close()
        os.close(out)


class _Writable:
    """Waits for the duplicate descriptor to take more bytes. The descriptor is watched from the first
    wait to the end of the file (one add_writer, not one per wait) and each wait is a bare future with a
    timer that looks at the connection every WAIT_SLICE (no task per wait, as wait_for made): a 3 MiB
    crate waits many times on a full socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, out: int, transport: Transport) -> None:
        self.loop, self.out, self.transport = loop, out, transport
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.watching = False

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _look(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.transport.is_closing():  # the guard (or the server) closed it meanwhile
            waiter.set_exception(ConnectionResetError("the connection was closed"))
        else:
            self.timer = self.loop.call_later(WAIT_SLICE, self._look)

    async def wait(self) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the connection was closed")
        if not self.watching:
            self.loop.add_writer(self.out, self._wake)
            self.watching = True
        self.waiter = self.loop.create_future()
        self.timer = self.loop.call_later(WAIT_SLICE, self._look)
        try:
            await self.waiter
        finally:
            self.timer.cancel()
            self.waiter = self.timer = None

    def close(self) -> None:
        if self.watching:
            self.loop.remove_writer(self.out)
