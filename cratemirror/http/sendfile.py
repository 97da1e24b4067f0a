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
from typing import Any, Protocol

WAIT_SLICE = 1.0  # seconds between looks at whether the connection was closed (the guard may abort it)


class Transport(Protocol):
    """What is used of a transport (uvloop's are not asyncio.WriteTransport subclasses)."""

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def get_write_buffer_size(self) -> int: ...
    def is_closing(self) -> bool: ...


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
    loop = asyncio.get_running_loop()
    try:
        offset = 0
        while offset < size:
            try:
                sent = os.sendfile(out, fd, offset, size - offset)
            except BlockingIOError:
                await _writable(loop, out, transport)
                continue
            except OSError as exc:  # EPIPE, ECONNRESET: the client left
                raise ConnectionResetError(str(exc)) from exc
            if sent == 0:
                raise ConnectionResetError("the file ended early or the client left")
            offset += sent
        return True
    finally:
        os.close(out)


async def _writable(loop: asyncio.AbstractEventLoop, out: int, transport: Transport) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(out, wake)
    try:
        while not ready.done():
            if transport.is_closing():
                raise ConnectionResetError("the connection was closed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ready), WAIT_SLICE)
    finally:
        loop.remove_writer(out)
