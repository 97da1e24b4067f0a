"""Memory under slow clients: peak RSS growth of a server's worker processes while many clients that
read slowly (a small receive buffer, small reads, pauses) download the large crate, cold then warm."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.procs import PeakRss, worker_pids

READ_SIZE = 16 * 1024
PAUSE = 0.02  # 16 KiB per 20 ms: about 0.8 MB/s per client
RCVBUF = 16 * 1024
CLIENT_TIMEOUT = 120.0


@dataclass(frozen=True)
class MemoryResult:
    workers: int
    baseline: int  # summed RSS of the workers before the cold phase, bytes
    cold_peak: int
    warm_peak: int
    cold_seconds: float
    warm_seconds: float

    @property
    def cold_growth(self) -> int:
        return max(0, self.cold_peak - self.baseline)

    @property
    def warm_growth(self) -> int:
        return max(0, self.warm_peak - self.baseline)


async def slow_download(port: int, path: str) -> int:
    """GET `path` over HTTP/1.1 reading slowly; returns the body size received (must be complete)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # before connect: sets the window
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status, length = _parse_head(head)
        if status != 200:
            raise RuntimeError(f"slow client: {path} answered {status}")
        received = 0
        deadline = time.monotonic() + CLIENT_TIMEOUT
        for _ in range(length // 1024 + 2):  # bounded: each read returns at least one byte
            if received >= length or time.monotonic() > deadline:
                break
            data = await reader.read(READ_SIZE)
            if not data:
                break
            received += len(data)
            await asyncio.sleep(PAUSE)
        if received != length:
            raise RuntimeError(f"slow client: got {received} of {length} bytes of {path}")
        return received
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _parse_head(head: bytes) -> tuple[int, int]:
    """(status, Content-Length) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.partition(":")[::2] for line in lines[1:])
    lengths = [value for key, value in fields.items() if key.strip().lower() == "content-length"]
    return int(lines[0].split()[1]), int(lengths[0]) if lengths else -1


async def _phase(port: int, path: str, clients: int, sampler: PeakRss) -> tuple[int, float]:
    started = time.perf_counter()
    sampler.start()
    try:
        await asyncio.gather(*(slow_download(port, path) for _ in range(clients)))
    finally:
        peak = await sampler.stop()
    return peak, time.perf_counter() - started


async def measure(
    server_pid: int, is_worker: Callable[[str], bool], port: int, path: str, clients: int
) -> MemoryResult:
    """The server must be freshly started with an empty cache (and have served a request or two)."""
    pids = worker_pids(server_pid, is_worker)
    if not pids:
        raise RuntimeError(f"no worker processes found under pid {server_pid}")
    sampler = PeakRss(pids)
    baseline = sampler.total()
    cold_peak, cold_seconds = await _phase(port, path, clients, sampler)
    warm_peak, warm_seconds = await _phase(port, path, clients, sampler)
    return MemoryResult(len(pids), baseline, cold_peak, warm_peak, cold_seconds, warm_seconds)
