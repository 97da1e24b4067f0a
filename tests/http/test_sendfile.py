"""Large stored crates go out through the kernel's sendfile under uvloop too (its event loop has no
loop.sendfile): byte for byte, to a reader slower than the socket, never past a closed connection, and
never while the transport still holds unsent bytes. Real sockets on loopback, a real uvloop loop."""

from __future__ import annotations

import array
import asyncio
import fcntl
import hashlib
import os
import socket
import termios
from pathlib import Path

import aiohttp
import pytest

from cratemirror.http.sendfile import can_sendfile, corked, sendfile
from tests.fake_upstream import make_crate_tarball
from tests.hostile_upstream import HostileUpstream, index_line, sha256
from tests.mirror_process import MirrorProcess

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")

SIZE = 8 * 1024 * 1024
DEADLINE = 30.0


def _data(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


async def _pair() -> tuple[asyncio.Transport, socket.socket]:
    """A uvloop transport (the sending side) and the plain socket at the other end."""
    listener = socket.create_server(("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    connect = loop.create_connection(asyncio.Protocol, *listener.getsockname()[:2])
    (transport, _), (peer, _) = await asyncio.gather(connect, loop.sock_accept(_nonblocking(listener)))
    listener.close()
    assert "uvloop" in type(transport).__module__
    return transport, peer


def _queued(fd: int) -> int:
    """Bytes in the kernel's send queue of a socket."""
    out = array.array("i", [0])
    fcntl.ioctl(fd, termios.TIOCOUTQ, out)
    return out[0]


def _nonblocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    return sock


async def _read_all(peer: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    for _ in range(size):  # bounded: at least one byte per pass
        if len(received) >= size:
            break
        chunk = await loop.sock_recv(peer, 64 * 1024)
        if not chunk:
            break
        received += chunk
    return bytes(received)


def test_sendfile_sends_every_byte_to_a_slower_reader(tmp_path: Path) -> None:
    path, data = _data(tmp_path)

    async def main() -> None:
        transport, peer = await _pair()
        try:
            assert can_sendfile(transport)
            with open(path, "rb") as file:
                sent, received = await asyncio.wait_for(
                    asyncio.gather(sendfile(transport, file.fileno(), SIZE), _read_all(peer, SIZE)), DEADLINE
                )
            assert sent is True
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        finally:
            transport.close()
            peer.close()

    uvloop.run(main())


def test_sendfile_declines_while_the_transport_holds_unsent_bytes(tmp_path: Path) -> None:
    path, _ = _data(tmp_path)

    async def main() -> None:
        transport, peer = await _pair()
        try:
            transport.write(b"x" * SIZE)  # the peer reads nothing: most of it stays in the transport
            assert transport.get_write_buffer_size() > 0
            with open(path, "rb") as file:
                assert await sendfile(transport, file.fileno(), SIZE) is False
        finally:
            transport.abort()
            peer.close()

    uvloop.run(main())


def test_sendfile_stops_when_the_connection_is_closed(tmp_path: Path) -> None:
    path, _ = _data(tmp_path)

    async def main() -> None:
        transport, peer = await _pair()
        try:
            with open(path, "rb") as file:
                task = asyncio.create_task(sendfile(transport, file.fileno(), SIZE))
                # The peer reads nothing, so the socket fills and sendfile waits for it; the connection
                # guard then aborts the transport, as it does to a stalled reader.
                fd = transport.get_extra_info("socket").fileno()
                for _ in range(1000):  # no event says "the kernel's send queue is filling": poll
                    if task.done() or _queued(fd) > 0:
                        break
                    await asyncio.sleep(0.01)
                assert _queued(fd) > 0 and not task.done()
                transport.abort()
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(task, DEADLINE)
        finally:
            peer.close()

    uvloop.run(main())


async def test_a_large_hit_from_a_real_server_is_byte_exact(tmp_path: Path) -> None:
    big = make_crate_tarball("big", "1.0.0", pad_to=SIZE)
    async with HostileUpstream() as upstream:
        upstream.serve_bytes("/index/3/b/big", index_line("big", "1.0.0", sha256(big)) + b"\n")
        upstream.serve_bytes("/dl/big/1.0.0/download", big)
        async with MirrorProcess(upstream.index_url, tmp_path / "cache", tmp_path, workers=1) as mirror:
            url = mirror.url + "/api/v1/crates/big/1.0.0/download"
            async with aiohttp.ClientSession() as session:
                for expected in ("MISS", "HIT", "HIT"):
                    async with session.get(url) as response:
                        body = await response.read()
                    assert (response.status, response.headers["X-Cache"]) == (200, expected)
                    assert sha256(body) == sha256(big)
                async with session.head(url) as response:
                    assert response.status == 200
                    assert response.headers["Content-Length"] == str(len(big))
                    assert await response.read() == b""


async def test_a_large_answer_is_corked_until_its_body_is_out() -> None:
    """TCP_CORK (nginx's tcp_nopush) holds the headers back for the file's first bytes, and is released
    when the body is out (else its last partial segment would wait up to 200 ms)."""
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def on_client(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await asyncio.open_connection("127.0.0.1", port)
    served = await accepted.get()
    try:
        sock = served.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
        with corked(served.transport):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
        with corked(None):  # no transport (the client left): nothing to do
            pass
    finally:
        client.close()
        served.close()
        server.close()
        await server.wait_closed()
