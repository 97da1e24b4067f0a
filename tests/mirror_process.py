"""Helpers for the mirror's integration tests.

:class:`MirrorProcess` runs ``python -m cratemirror serve`` as a real subprocess on a free loopback
port (the fake upstream keeps running in the test's event loop, so it is started with asyncio), waits
for /healthz and for every worker to listen, and stops it with SIGTERM.  The other helpers read
Prometheus text, send raw (unnormalised) request paths, and wait for a condition with a bounded poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
from yarl import URL

__all__ = [
    "MirrorProcess",
    "Service",
    "clean_env",
    "free_port",
    "listening_sockets",
    "metric_value",
    "raw_http",
    "raw_url",
    "wait_until",
]

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
GROUP_GRACE = 5.0
_TCP_LISTEN = "0A"


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening_sockets(port: int) -> int:
    """How many TCP sockets listen on `port`: with SO_REUSEPORT each worker process has its own, so
    this tells when every worker is accepting (/healthz alone may be answered by the first one)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if (
                    len(fields) > 3
                    and fields[3] == _TCP_LISTEN
                    and int(fields[1].rsplit(":", 1)[1], 16) == port
                ):
                    count += 1
    return count


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without settings that would leak into a child mirror's config."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CRATEMIRROR_") and key != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(extra)
    return env


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    what: str,
    timeout: float = 10.0,  # noqa: ASYNC109 - a poll budget, not a cancellation timeout
    interval: float = 0.02,
) -> None:
    """Poll `check` until it is true; bounded in attempts and in time."""
    deadline = time.monotonic() + timeout
    for _ in range(max(1, int(timeout / interval))):
        if await check():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(interval)
    raise AssertionError(f"gave up after {timeout:g}s waiting for {what}")


# ---- Prometheus text ---------------------------------------------------------------------------------

_SAMPLE_RE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`. A metric that is not in the text
    at all is an error (a renamed metric must fail the test, not read as 0)."""
    total = 0.0
    seen = False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if match is None or match.group(1) != name:
            continue
        seen = True
        sample_labels = dict(_LABEL_RE.findall(match.group(2) or ""))
        if all(sample_labels.get(key) == value for key, value in labels.items()):
            total += float(match.group(3))
    if not seen:
        raise KeyError(f"metric {name} not in the /metrics text")
    return total


# ---- raw requests ------------------------------------------------------------------------------------


def raw_url(base: str, path: str) -> URL:
    """`base` + `path` exactly as written: no percent-decoding, no dot-segment removal by the client."""
    return URL(base.rstrip("/") + path, encoded=True)


async def raw_http(host: str, port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:  # noqa: ASYNC109
    """Send raw bytes (a malformed request line no HTTP client would produce) and return the status
    code and body of the answer (0 and b"" if the server closed without answering)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(1 << 20), timeout=timeout)
        while data and b"\r\n\r\n" in data and not await _complete(data):
            more = await asyncio.wait_for(reader.read(1 << 20), timeout=timeout)
            if not more:
                break
            data += more
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    if not data:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    return int(status_line[1]), body


async def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return True


class Service:
    """A server the test starts and stops: `async with` does both."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


# ---- the mirror as a subprocess ----------------------------------------------------------------------


class MirrorProcess(Service):
    """``python -m cratemirror serve`` on a free loopback port, in its own session (process group)."""

    def __init__(
        self,
        upstream: str,
        cache_dir: Path,
        workdir: Path,
        *,
        workers: int = 2,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.upstream = upstream
        #: with a CA file the mirror serves https (its config has server.tls_*); the probes trust that CA
        self.ca_file = ca_file
        self.cache_dir = cache_dir
        self.workdir = workdir
        self.workers = workers
        self.extra_args = list(extra_args)
        self.env = dict(env or {})  # added to the clean environment
        self.port = 0
        self.log_path = workdir / "mirror.log"
        self.proc: asyncio.subprocess.Process | None = None
        #: set by stop(): whether worker processes outlived the supervisor
        self.leftovers = False

    @property
    def url(self) -> str:
        scheme = "https" if self.ca_file is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def output(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")
        return ""

    async def start(self) -> None:
        # A second start would orphan the first process (it is only ever stopped through self.proc).
        assert self.proc is None or self.proc.returncode is not None, "MirrorProcess is already running"
        self.port = free_port()
        args = [
            "-m", "cratemirror", "serve",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", str(self.workers),
            "--upstream", self.upstream,
            "--cache-dir", str(self.cache_dir),
            *self.extra_args,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *args,
                cwd=str(self.workdir),
                env=clean_env(**self.env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None
        timeout = aiohttp.ClientTimeout(total=2)
        ssl_context = None if self.ca_file is None else ssl.create_default_context(cafile=self.ca_file)
        connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def ready() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(f"mirror exited with {proc.returncode}:\n{self.output()}")
                try:
                    async with session.get(f"{self.url}/healthz") as response:
                        healthy = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False
                return healthy and listening_sockets(self.port) >= self.workers

            await wait_until(ready, f"the mirror to serve on {self.url}", START_TIMEOUT, 0.05)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int:  # noqa: ASYNC109
        """SIGTERM, wait up to `timeout`, then SIGKILL the whole process group; returns the exit code
        (negative: killed by that signal)."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        # multiprocessing's resource tracker (same process group) exits once the supervisor is gone.
        self.leftovers = not await _group_gone(proc.pid, GROUP_GRACE)
        if self.leftovers:
            log = self.log_path.open("a")
            with log:
                log.write(f"[MirrorProcess] left in the process group: {_group_members(proc.pid)}\n")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode is not None
        return proc.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _group_gone(pgid: int, grace: float) -> bool:
    """Whether every process of the group has exited within `grace` seconds (bounded poll)."""
    deadline = time.monotonic() + grace
    for _ in range(int(grace / 0.02) + 1):
        if not _group_alive(pgid):
            return True
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    return not _group_alive(pgid)


def _group_members(pgid: int) -> list[str]:
    """`pid: command line` of the processes still in the group (for the failure message)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                members.append(f"{stat.parent.name}: {cmdline.strip()}")
    return members
