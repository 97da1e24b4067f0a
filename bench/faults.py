"""`python -m bench.faults`: what a stalled or failed dependency costs a fleet (issue 22).

A fleet as docs/fleet describes it: 3 replicas (`storage.backend: s3` on moto's S3 server, one
redis-server, one worker each) behind deploy/haproxy/haproxy.cfg (TLS, HTTP/2), the fake upstream in
this process. tests/faultproxy.py sits between the replicas and the bucket and between the replicas and
the upstream, so each can be black-holed, delayed or reset. For each fault: a real `cargo fetch` of a
30-crate tree on a fresh CARGO_HOME, cold (a tree no replica has seen) and warm (the same tree again),
while the fault holds, and how long until the fleet is healthy again once it is removed (every replica's
/readyz plain "ready"; for the bucket also: every crate of the tree back in the bucket).

Needs cargo, haproxy, redis-server and openssl; everything on 127.0.0.1, stopped at the end; prints one
Markdown table (the one in docs/failure-modes.md). About a minute and a half.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from tests.fake_upstream import Dep, FakeRegistry, run_cargo, write_cargo_home, write_cargo_project
from tests.faultproxy import FaultProxy, Mode
from tests.fleet_support import FrontTLS, HAProxy, MotoS3, RedisServer, make_tls, replicas
from tests.mirror_process import MirrorProcess

TOP = 6  # the tree: app -> 6 crates -> 4 crates each = 30 crates
LEAVES = 4
HEALTHY_LIMIT = 60.0  # seconds to wait for the fleet to be healthy again before giving up
S3_TIMEOUT = "3s"  # storage.s3.timeout (the shipped default)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


TREES: dict[str, list[str]] = {}  # a tree's first crate -> every crate of it


def publish_tree(registry: FakeRegistry, tag: str) -> dict[str, str]:
    """30 fresh crates named after `tag`; the app's dependencies."""
    top: dict[str, str] = {}
    every: list[str] = []
    for t in range(TOP):
        leaves = [f"{tag}-l{t}-{n}" for n in range(LEAVES)]
        for leaf in leaves:
            registry.add_crate(leaf, "1.0.0")
        name = f"{tag}-t{t}"
        registry.add_crate(name, "1.0.0", deps=[Dep(leaf, "^1") for leaf in leaves])
        top[name] = "1.0.0"
        every += [name, *leaves]
    TREES[next(iter(top))] = every
    return top


@dataclass
class Fleet:
    registry: FakeRegistry
    front: HAProxy
    mirrors: list[MirrorProcess]
    tls: FrontTLS
    moto: MotoS3
    redis: RedisServer
    s3_proxy: FaultProxy
    upstream_proxy: FaultProxy
    tmp: Path
    runs: int = 0
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    async def cargo(self, deps: dict[str, str]) -> tuple[bool, float]:
        """A fresh CARGO_HOME and project: (succeeded, seconds)."""
        self.runs += 1
        project = self.tmp / f"app{self.runs}"
        write_cargo_project(project, deps)
        home = self.tmp / f"home{self.runs}"
        write_cargo_home(home, f"{self.front.url}/index/")
        with (home / "config.toml").open("a") as config:
            config.write(f'\n[http]\ncainfo = "{self.tls.ca_cert}"\nmultiplexing = true\n')
        started = time.monotonic()
        code, output = await run_cargo(["fetch"], project, home, timeout=180)
        took = time.monotonic() - started
        if code != 0:
            log(f"cargo failed after {took:.1f}s: {output.strip().splitlines()[-1:]}")
        return code == 0, took

    async def ready_everywhere(self, session: aiohttp.ClientSession) -> bool:
        for mirror in self.mirrors:
            try:
                async with session.get(f"{mirror.url}/readyz") as response:
                    if (response.status, await response.text()) != (200, "ready\n"):
                        return False
            except aiohttp.ClientError:
                return False
        return True

    def bucket_has(self, names: list[str]) -> bool:
        keys = set(self.moto.object_keys())
        return all(f"crates/{name}/1.0.0.crate" in keys for name in names)


async def until(check: Callable[[], Awaitable[bool]], limit: float = HEALTHY_LIMIT) -> float | None:
    """Seconds until `check` holds (polled every 50 ms), None past `limit`."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


def seconds(ok: bool, took: float) -> str:
    return f"{took:.1f} s" if ok else f"**fails** after {took:.1f} s"


@asynccontextmanager
async def fleet(tmp: Path) -> AsyncIterator[Fleet]:
    async with AsyncExitStack() as stack:
        registry = await stack.enter_async_context(FakeRegistry())
        moto = stack.enter_context(MotoS3())
        redis = await stack.enter_async_context(RedisServer(tmp / "redis"))
        s3_proxy = await stack.enter_async_context(FaultProxy("127.0.0.1", moto.port))
        upstream_port = urlsplit(registry.url).port
        assert upstream_port is not None
        upstream_proxy = await stack.enter_async_context(FaultProxy("127.0.0.1", upstream_port))
        text = (
            moto.yaml().replace(f"endpoint_url: {moto.endpoint}", f"endpoint_url: {s3_proxy.url}")
            + f"    timeout: {S3_TIMEOUT}\ncoordination:\n  redis_url: {redis.url}\n"
        )
        mirrors = await stack.enter_async_context(
            replicas(f"{upstream_proxy.url}/index/", tmp, 3, config_text=text)
        )
        tls = make_tls(tmp / "tls")
        (tmp / "front").mkdir()
        front = await stack.enter_async_context(
            HAProxy(tmp / "front", tls, [("127.0.0.1", m.port) for m in mirrors])
        )
        yield Fleet(registry, front, mirrors, tls, moto, redis, s3_proxy, upstream_proxy, tmp)


async def run(tmp: Path) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    context = ssl.create_default_context()
    async with fleet(tmp) as f, aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:

        async def healthy() -> bool:
            return await f.ready_everywhere(session)

        async def row(
            name: str,
            apply: Callable[[], Awaitable[None]],
            remove: Callable[[], Awaitable[None]],
            also: Callable[[dict[str, str]], Awaitable[str]] | None = None,
        ) -> None:
            deps = publish_tree(f.registry, f"x{len(rows)}")
            log(f"{name} ...")
            await apply()
            try:
                cold = await f.cargo(deps)
                warm = await f.cargo(deps)
            finally:
                await remove()
                removed = time.monotonic()
            back = await until(healthy)
            recovery = "not within 60 s" if back is None else f"{time.monotonic() - removed:.1f} s"
            if also is not None:
                recovery += await also(deps)
            rows.append((name, seconds(*cold), seconds(*warm), recovery))

        async def nothing() -> None:
            return None

        def proxy(which: FaultProxy, mode: Mode, latency: float = 0.0) -> Callable[[], Awaitable[None]]:
            async def switch() -> None:
                which.set(mode, latency)

            return switch

        async def in_bucket(names: list[str]) -> str:
            async def check() -> bool:
                return await asyncio.to_thread(f.bucket_has, names)

            took = await until(check)
            every = len(names)
            return f"; all {every} crates in the bucket: " + ("no" if took is None else f"{took:.1f} s later")

        async def refilled(deps: dict[str, str]) -> str:
            """This tree's crates, filled while the fault held, are in the bucket."""
            return await in_bucket(TREES[next(iter(deps))])

        async def refilled_all(deps: dict[str, str]) -> str:
            """Every crate of every tree so far: those the bucket lost too."""
            return await in_bucket([name for tree in TREES.values() for name in tree])

        def signal_all(pids: Callable[[], list[int]], sig: signal.Signals) -> Callable[[], Awaitable[None]]:
            async def send() -> None:
                for pid in pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, sig)

            return send

        def victim() -> list[int]:
            proc = f.mirrors[0].proc
            return [proc.pid] if proc is not None else []

        def redis_pid() -> list[int]:
            return [f.redis.proc.pid] if f.redis.proc is not None else []

        async def s3_empty_and_down() -> None:
            f.s3_proxy.set(Mode.RESET)
            client = f.moto.client()
            for key in await asyncio.to_thread(f.moto.object_keys):
                await asyncio.to_thread(client.delete_object, Bucket=f.moto.bucket, Key=key)

        async def upstream_recovery() -> None:
            """Upstream resets for a few seconds (a build of uncached crates fails, as expected); then
            the first build after it answers again."""
            deps = publish_tree(f.registry, f"x{len(rows)}")
            log("upstream resets, then recovers ...")
            f.upstream_proxy.set(Mode.RESET)
            during = await f.cargo(deps)
            f.upstream_proxy.set(Mode.PASS)
            after = await f.cargo(deps)
            again = await f.cargo(deps)
            rows.append(
                (
                    "upstream resets every connection, then answers again",
                    f"during: {seconds(*during)} (uncached: expected); first build after: {seconds(*after)}",
                    seconds(*again),
                    "the first request after it (half-open probe)",
                )
            )

        await row("no fault (baseline)", nothing, nothing)
        await row("S3 black hole (accepted, never answered)", proxy(f.s3_proxy, Mode.BLACKHOLE),
                  proxy(f.s3_proxy, Mode.PASS), refilled)  # fmt: skip
        await row("S3 +2 s per connection and per chunk", proxy(f.s3_proxy, Mode.LATENCY, 2.0),
                  proxy(f.s3_proxy, Mode.PASS), refilled)  # fmt: skip
        await row("S3 down (resets), restarted empty", s3_empty_and_down, proxy(f.s3_proxy, Mode.PASS),
                  refilled_all)  # fmt: skip
        await row("one replica SIGSTOP (hung)", signal_all(victim, signal.SIGSTOP),
                  signal_all(victim, signal.SIGCONT))  # fmt: skip
        await row("Redis SIGSTOP (hung)", signal_all(redis_pid, signal.SIGSTOP),
                  signal_all(redis_pid, signal.SIGCONT))  # fmt: skip
        await upstream_recovery()
    return rows


def table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = [
        "| fault (held while cargo runs) | cold cargo, 30 crates | warm cargo "
        "| back to healthy after removal |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs)")
    args = parser.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    tmp = Path(tempfile.mkdtemp(prefix="cratemirror-faults-"))
    try:
        rows = asyncio.run(run(tmp))
    finally:
        if not args.keep_tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")
    print("## Failure modes\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
