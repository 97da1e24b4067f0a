"""Helpers for the fleet tests (tests/fleet/); holds no tests itself.

A throwaway certificate authority and server certificate (the `openssl` CLI), the real HAProxy running
deploy/haproxy/haproxy.cfg with the replicas' loopback addresses rendered in, and a real redis-server.
Every process runs in its own session on 127.0.0.1 and is stopped by the test that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime
import io
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from tests.mirror_process import MirrorProcess, Service, clean_env, free_port, wait_until
from tests.system_tools import require_tool

REPO = Path(__file__).resolve().parents[1]
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def require(tool: str, package: str) -> str:
    """The tool's path; a missing tool skips the test naming it (fails in CI, where .ci/run installs it)."""
    return require_tool(tool, f"Debian package {package}")


# ---- TLS --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontTLS:
    ca_cert: Path  # what cargo trusts (CARGO_HTTP_CAINFO)
    server_pem: Path  # certificate followed by its key, as HAProxy's `crt` wants it


def make_tls(directory: Path) -> FrontTLS:
    """A CA made for this test and a certificate for 127.0.0.1 signed by it."""
    openssl = require("openssl", "openssl")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=cratemirror test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")  # fmt: skip
    (directory / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
    )
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    combined = directory / "haproxy.pem"
    combined.write_bytes((directory / "server.pem").read_bytes() + (directory / "server.key").read_bytes())
    return FrontTLS(directory / "ca.pem", combined)


# ---- HAProxy ------------------------------------------------------------------------------------------


def render_haproxy_cfg(servers: Sequence[tuple[str, int]], stats_socket: Path) -> str:
    """deploy/haproxy/haproxy.cfg with fixed loopback servers in place of the DNS server-template, and
    a stats socket the test reads. Everything else is the shipped file, unchanged."""
    lines = HAPROXY_CFG.read_text().splitlines()
    template = [i for i, line in enumerate(lines) if line.strip().startswith("server-template ")]
    assert len(template) == 1, "deploy/haproxy/haproxy.cfg must have one server-template line"
    servers_lines = [f"    server mirror{n} {host}:{port}" for n, (host, port) in enumerate(servers, 1)]
    lines[template[0] : template[0] + 1] = servers_lines
    glob = lines.index("global")
    lines.insert(glob + 1, f"    stats socket {stats_socket} mode 600 level admin")
    return "\n".join(lines) + "\n"


def plain_tls_front_cfg(server: tuple[str, int], stats_socket: Path) -> str:
    """A bare TLS + h2 front for one server (no /readyz: e.g. the fake upstream, as crates.io serves)."""
    host, port = server
    return (
        f"global\n    stats socket {stats_socket} mode 600 level admin\n"
        "    log stdout format raw local0 info\n"
        "defaults\n    mode http\n    log global\n    option httplog\n    timeout connect 2s\n"
        "    timeout client 60s\n    timeout server 60s\n"
        'frontend front\n    bind "${CRATEMIRROR_FRONT_BIND}" ssl crt "${CRATEMIRROR_FRONT_PEM}"'
        " alpn h2,http/1.1\n"
        "    default_backend mirrors\n"
        f"backend mirrors\n    server only {host}:{port} check\n"
    )


class HAProxy(Service):
    """The real haproxy in the foreground (-db) with the shipped config, on a free loopback port
    (`bare=True`: plain_tls_front_cfg for the first server instead)."""

    def __init__(
        self, workdir: Path, tls: FrontTLS, servers: Sequence[tuple[str, int]], *, bare: bool = False
    ) -> None:
        self.workdir = workdir
        self.tls = tls
        self.bare = bare
        self.servers = list(servers)
        self.port = 0
        self.socket = workdir / "haproxy.sock"
        self.cfg = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def output(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")
        return ""

    async def start(self) -> None:
        haproxy = require("haproxy", "haproxy")
        self.port = free_port()
        if self.bare:
            self.cfg.write_text(plain_tls_front_cfg(self.servers[0], self.socket))
        else:
            self.cfg.write_text(render_haproxy_cfg(self.servers, self.socket))
        env = clean_env(
            CRATEMIRROR_FRONT_BIND=f"127.0.0.1:{self.port}",
            CRATEMIRROR_FRONT_PEM=str(self.tls.server_pem),
            CRATEMIRROR_REPLICAS="unused:1",
        )
        with open(self.log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                haproxy, "-db", "-f", str(self.cfg),
                cwd=str(self.workdir), env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            await self.wait_servers_up(len(self.servers))
        except BaseException:
            await self.stop()
            raise

    async def wait_servers_up(self, count: int) -> None:
        async def up() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n{self.output()}")
            try:
                stats = await self.server_stats()
            except OSError:
                return False
            return sum(row["status"] == "UP" for row in stats.values()) >= count

        await wait_until(up, f"{count} replicas UP in haproxy", START_TIMEOUT, 0.05)

    async def command(self, line: str) -> str:
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), 5.0)).decode()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def server_stats(self) -> dict[str, dict[str, str]]:
        """`show stat` rows of the backend's servers by server name (status, stot, wretr, wredis, ...)."""
        text = (await self.command("show stat")).lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row
            for row in rows
            if row.get("pxname") == "mirrors" and row.get("svname") not in ("FRONTEND", "BACKEND")
        }

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


# ---- Redis ----------------------------------------------------------------------------------------------


class RedisServer(Service):
    """A real redis-server on a free loopback port, no persistence, in its own session."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.log_path = workdir / "redis.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, port: int | None = None) -> None:
        redis_server = require("redis-server", "redis-server")
        self.port = port or self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                redis_server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir),
                cwd=str(self.workdir), env=clean_env(), stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

        async def answers() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}")
            return await self.ping()

        try:
            await wait_until(answers, "redis-server to answer PING", START_TIMEOUT, 0.02)
        except BaseException:
            await self.kill()
            raise

    async def ping(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 2.0)) == b"+PONG\r\n"
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def kill(self) -> None:
        """SIGKILL (what a crashed Redis looks like to the replicas)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()

    async def stop(self) -> None:
        await self.kill()


# ---- processes ----------------------------------------------------------------------------------------


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(stat.parent.name))
    return pids


def connected_to(pgid: int, port: int) -> bool:
    """Whether a process of group `pgid` has an established TCP connection to 127.0.0.1:`port`."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    for pid in _group_pids(pgid):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return True
    return False


# ---- S3 (moto's real S3 server) ---------------------------------------------------------------------


def set_stored_at(moto: MotoS3, key: str, when: float) -> None:
    """Back-date an object's LastModified in moto's in-process backend: S3 stamps whole seconds, and a
    test should not wait seconds for distinct ones."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    bucket = s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[moto.bucket]
    bucket.keys[key].last_modified = datetime.datetime.fromtimestamp(when, datetime.UTC).replace(tzinfo=None)


class MotoS3:
    """moto's S3 server (ThreadedMotoServer: a real HTTP server speaking the S3 API) on loopback, with
    one bucket. The S3 code under test talks to it as it would to MinIO or AWS."""

    ACCESS_KEY = "test-access-key"
    SECRET_KEY = "test-secret-key"
    INTEGRITY_KEY = "test-fleet-integrity-key-0123456789abcdef"  # storage.s3.integrity_key

    def __init__(self) -> None:
        # moto keeps its state per process, across servers: a bucket of its own per test.
        self.bucket = f"crates-{uuid.uuid4().hex[:12]}"
        self.port = 0
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.client().create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> Any:
        """A plain boto3 client (moto's own dependency), for the test's side of the bucket."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY,
        )  # fmt: skip

    def object_keys(self) -> list[str]:
        listing = self.client().list_objects_v2(Bucket=self.bucket)
        return [item["Key"] for item in listing.get("Contents", [])]

    def yaml(self, serve: str = "proxy") -> str:
        """The storage section of a mirror.yaml for this server."""
        return (
            "storage:\n  backend: s3\n  s3:\n"
            f"    bucket: {self.bucket}\n    endpoint_url: {self.endpoint}\n    region: us-east-1\n"
            f"    access_key_id: {self.ACCESS_KEY}\n    secret_access_key: {self.SECRET_KEY}\n"
            f"    serve: {serve}\n    integrity_key: {self.INTEGRITY_KEY}\n"
        )


# ---- replicas -----------------------------------------------------------------------------------------


@asynccontextmanager
async def replicas(
    index_url: str,
    tmp_path: Path,
    count: int,
    *,
    config_text: str = "",
    workers: int = 1,
    shared_cache: bool = False,
) -> AsyncIterator[list[MirrorProcess]]:
    """`count` mirror processes against the upstream at `index_url`, all reading one mirror.yaml
    (`config_text` plus quiet logs), each with its own workdir and, unless `shared_cache`, cache dir."""
    config = tmp_path / "mirror.yaml"
    config.write_text(config_text + "logging:\n  level: warning\n")
    async with AsyncExitStack() as stack:
        mirrors = []
        for n in range(count):
            workdir = tmp_path / f"replica{n}"
            workdir.mkdir()
            cache = tmp_path / "cache" if shared_cache else workdir / "cache"
            mirror = MirrorProcess(
                index_url, cache, workdir, workers=workers, extra_args=("--config", str(config))
            )
            stack.push_async_callback(mirror.stop)  # stopped however far it got
            mirrors.append(mirror)
        # Started side by side (each spends its start-up mostly importing); one failing stops the rest.
        async with asyncio.TaskGroup() as group:
            for mirror in mirrors:
                group.create_task(mirror.start())
        yield mirrors
