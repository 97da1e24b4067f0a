"""Client connections of one worker: a cap on their number, and no connection held by a client that
does nothing.

aiohttp closes idle keep-alive connections, but not one whose request head never completes
(slowloris) nor one whose reader stopped taking the answer. A sweeper looks at every connection once
a tick: an idle one (no request in flight, nothing left to send) older than `idle_timeout` is closed;
one with bytes waiting to go out is closed when the client acknowledged less than MIN_PROGRESS of them
in `idle_timeout`. Progress is read from the kernel (TCP_INFO's bytes acked, the send queue), so it
counts sendfile and buffered writes alike.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import resource
import socket
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger("cratemirror.connections")

MIN_PROGRESS = 16 * 1024  # bytes a reader must take per idle_timeout (cargo itself wants 10 B/s)
_TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info
_TCP_INFO_SIZE = 128


@dataclass
class _Conn:
    transport: asyncio.Transport
    opened: float
    idle_since: float
    in_flight: int = 0
    acked: int = 0
    progress_at: float = field(default=0.0)


class ConnectionGuard:
    def __init__(self, max_connections: int, idle_timeout: float) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._conns: dict[Any, _Conn] = {}
        self._task: asyncio.Task[None] | None = None
        self.closed_idle = 0
        self.closed_stalled = 0
        self.closed_over_cap = 0

    # --- wiring --------------------------------------------------------------------------------

    def attach(self, server: web.Server, on_request: Callable[[web.BaseRequest], None] | None = None) -> None:
        """Hook the server's connection events and its request handler (its public callbacks; each
        connection takes the handler when it opens, so this runs before the site listens) and start the
        sweeper. No application middleware: the request hook is one call around the handler, and calls
        `on_request` first (the access log's timing)."""
        made, lost, handle = server.connection_made, server.connection_lost, server.request_handler
        conns = self._conns

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            now = time.monotonic()
            self._conns[handler] = _Conn(transport, now, now, progress_at=now)
            if len(self._conns) > self.max_connections:
                self._make_room(handler)

        def connection_lost(handler: Any, exc: BaseException | None) -> None:
            self._conns.pop(handler, None)
            lost(handler, exc)

        async def request_handler(request: web.BaseRequest) -> web.StreamResponse:
            if on_request is not None:
                on_request(request)
            conn = conns.get(request.protocol)
            if conn is None:  # already gone
                return await handle(request)
            conn.in_flight += 1
            try:
                return await handle(request)
            finally:
                conn.in_flight -= 1
                conn.idle_since = time.monotonic()

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign,assignment]
        server.request_handler = request_handler
        self._task = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # --- policy --------------------------------------------------------------------------------

    def _make_room(self, newcomer: Any) -> None:
        """Over the cap: close the oldest idle connections first; with none idle, refuse the newcomer."""
        idle = sorted(
            (conn.idle_since, key) for key, conn in self._conns.items()
            if key is not newcomer and conn.in_flight == 0 and _pending(conn.transport) == 0
        )  # fmt: skip
        excess = len(self._conns) - self.max_connections
        victims = [key for _, key in idle[:excess]] or [newcomer]
        for key in victims:
            self._close(key, "over server.max_connections")
            self.closed_over_cap += 1

    async def _sweep(self) -> None:
        interval = max(0.05, min(1.0, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for key, conn in list(self._conns.items()):
                verdict = self._verdict(conn, now)
                if verdict is not None:
                    self._close(key, verdict)

    def _verdict(self, conn: _Conn, now: float) -> str | None:
        pending = _pending(conn.transport)
        if pending > 0:
            acked = _bytes_acked(conn.transport)
            if acked - conn.acked >= MIN_PROGRESS or acked < conn.acked:
                conn.acked, conn.progress_at = acked, now
            elif now - conn.progress_at > self.idle_timeout:
                self.closed_stalled += 1
                return f"the client took less than {MIN_PROGRESS} bytes in {self.idle_timeout:g}s"
            return None
        conn.acked, conn.progress_at = _bytes_acked(conn.transport), now
        if conn.in_flight == 0 and now - conn.idle_since > self.idle_timeout:
            self.closed_idle += 1
            return f"no complete request in {self.idle_timeout:g}s"
        return None

    def _close(self, key: Any, reason: str) -> None:
        conn = self._conns.pop(key, None)
        if conn is None:
            return
        peer = conn.transport.get_extra_info("peername")
        log.debug("closing connection from %s: %s", peer[0] if isinstance(peer, tuple) else "-", reason)
        conn.transport.abort()


def _socket(transport: asyncio.Transport) -> Any:
    sock = transport.get_extra_info("socket")  # asyncio's TransportSocket (fileno, getsockopt)
    return sock if sock is not None and sock.fileno() >= 0 else None


def _pending(transport: asyncio.Transport) -> int:
    """Bytes written but not yet taken by the client: the transport's buffer plus the kernel queue."""
    pending = transport.get_write_buffer_size()
    sock = _socket(transport)
    if sock is not None:
        with contextlib.suppress(OSError):
            out = array.array("i", [0])
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, out)
            pending += out[0]
    return pending


def _bytes_acked(transport: asyncio.Transport) -> int:
    sock = _socket(transport)
    if sock is None:
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return 0
    if len(info) < _TCPI_BYTES_ACKED + 8:
        return 0
    return int(struct.unpack_from("Q", info, _TCPI_BYTES_ACKED)[0])


def raise_open_file_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: at the common default of 1,024, a thousand idle
    sockets would leave no descriptor for a new client. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft
