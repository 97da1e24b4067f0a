"""`python -m bench.toolchains`: the toolchain part of the benchmark (issue 20).

1. Warm hits on one large component (default 100 MB, incompressible): wrk against cratemirror's
   `/toolchains/dist/...` and against nginx serving the same file from disk (sendfile), MB/s; and the
   mirror workers' peak RSS growth while 50 connections download it at once.
2. A cold `rustup toolchain install stable --profile minimal` with a fresh RUSTUP_HOME: straight from a
   dist server with 50 ms added per request, and through a cold mirror (fresh cache dir) in front of it.

The dist server is tests/dist_server.py (manifests signed at start with a throwaway key, which the
mirror is configured to trust), in this process; the mirror runs as `cratemirror serve --workers 2`.
Needs nginx, wrk, gpg and rustup on PATH. Prints a table and appends it to bench/RESULTS-toolchains.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.loadgen import run_wrk, write_paths
from bench.nginx import nginx_binary
from bench.procs import Child, PeakRss, mirror_worker, worker_pids
from tests.dist_server import ORIGIN, TRIPLE, DistServer, Release, TestSigningKey, build_release
from tests.mirror_process import MirrorProcess, free_port

REPO = Path(__file__).resolve().parent.parent
DATE = "2026-01-01"
WORKERS = 2

NGINX_CONF = """\
{user}worker_processes 2;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def large_release(size: int) -> Release:
    """The stable release of tests/dist_server.py, its rustc tarball carrying `size` random bytes."""
    release = build_release("stable", "1.90.0", DATE)
    top = f"rustc-1.90.0-{TRIPLE}"
    blob = os.urandom(size)
    files = {
        "rust-installer-version": b"3\n",
        "components": b"rustc\n",
        "rustc/manifest.in": b"file:bin/rustc\nfile:lib/blob\n",
        "rustc/bin/rustc": b"#!/bin/sh\necho 'rustc 1.90.0 (0000000 2026-01-01)'\n",
        "rustc/lib/blob": blob,
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for folder in (top, f"{top}/rustc", f"{top}/rustc/bin", f"{top}/rustc/lib"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, body in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = len(body), 0o755 if "/bin/" in name else 0o644
            tar.addfile(info, io.BytesIO(body))
    body = gzip.compress(raw.getvalue(), compresslevel=1, mtime=0)
    path = f"dist/{DATE}/rustc-1.90.0-{TRIPLE}.tar.gz"
    old_hash = hashlib.sha256(release.files[path]).hexdigest()
    release.files[path] = body
    release.manifest = release.manifest.replace(old_hash.encode(), hashlib.sha256(body).hexdigest().encode())
    assert f"{ORIGIN}/{path}".encode() in release.manifest
    return release


async def start_mirror(work: Path, dist: DistServer, key: TestSigningKey, cache: str) -> MirrorProcess:
    mirror = MirrorProcess(
        "http://127.0.0.1:9/index/", work / cache, work, workers=WORKERS,
        env={
            "CRATEMIRROR_TOOLCHAINS_UPSTREAM": dist.url,
            "CRATEMIRROR_TOOLCHAINS_SIGNING_KEY": str(key.public_key),
            "CRATEMIRROR_LOGGING_LEVEL": "warning",
        },
    )  # fmt: skip
    await mirror.start()
    return mirror


async def rustup_install(dist_server: str, home: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUSTUP_", "CARGO", "RUSTC"))}
    env.update(
        RUSTUP_HOME=str(home / "rustup"), CARGO_HOME=str(home / "cargo"),
        RUSTUP_DIST_SERVER=dist_server, RUSTUP_UPDATE_ROOT=f"{dist_server}/rustup",
    )  # fmt: skip
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        "rustup", "toolchain", "install", "stable", "--profile", "minimal", "--no-self-update",
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 600)
    if process.returncode != 0:
        raise RuntimeError(f"rustup failed:\n{out.decode(errors='replace')}")
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> str:
    missing = [tool for tool in ("wrk", "gpg", "gpgv", "rustup") if shutil.which(tool) is None]
    if nginx_binary() is None:
        missing.append("nginx")
    if missing:
        raise SystemExit(f"bench.toolchains: missing {', '.join(missing)} on PATH")
    size = int(args.size_mb * 1_000_000)
    work = Path(tempfile.mkdtemp(prefix="bench-toolchains-"))
    rows: list[tuple[str, str]] = []
    try:
        key = await asyncio.to_thread(TestSigningKey, work / "gnupg")
        release = await asyncio.to_thread(large_release, size)
        component = f"dist/{DATE}/rustc-1.90.0-{TRIPLE}.tar.gz"
        async with DistServer(key) as dist:
            dist.publish(release)
            # --- warm hits: mirror vs nginx on the same file ---
            root = work / "static"
            (root / f"dist/{DATE}").mkdir(parents=True)
            (root / component).write_bytes(release.files[component])
            prefix = work / "nginx"
            (prefix / "tmp").mkdir(parents=True)
            port = free_port()
            conf = NGINX_CONF.format(
                user="user root;\n" if os.geteuid() == 0 else "", prefix=prefix, port=port, root=root
            )
            (prefix / "nginx.conf").write_text(conf)
            binary = nginx_binary()
            assert binary is not None
            argv = [
                binary,
                "-p",
                str(prefix),
                "-c",
                str(prefix / "nginx.conf"),
                "-e",
                str(prefix / "stderr.log"),
            ]
            nginx = Child("nginx", argv, prefix / "console.log", prefix, dict(os.environ))
            await nginx.start()
            mirror = await start_mirror(work, dist, key, "cache-warm")
            try:
                async with aiohttp.ClientSession() as session:
                    for base in (mirror.url + "/toolchains", f"http://127.0.0.1:{port}"):
                        for _ in range(100):
                            try:
                                async with session.get(f"{base}/{component}") as answer:
                                    body = await answer.read()
                                    if answer.status == 200 and len(body) == len(release.files[component]):
                                        break
                            except aiohttp.ClientError:
                                pass
                            await asyncio.sleep(0.1)
                paths = write_paths(work / "paths.txt", [f"/toolchains/{component}"])
                nginx_paths = write_paths(work / "nginx-paths.txt", [f"/{component}"])
                mirror_mb, nginx_mb = [], []
                for _ in range(args.rounds):
                    result = await run_wrk(mirror.url, paths, connections=16, seconds=args.seconds)
                    mirror_mb.append(result.mb_per_s)
                    result = await run_wrk(
                        f"http://127.0.0.1:{port}", nginx_paths, connections=16, seconds=args.seconds
                    )
                    nginx_mb.append(result.mb_per_s)
                m, n = statistics.median(mirror_mb), statistics.median(nginx_mb)
                rows.append(
                    (
                        f"warm {args.size_mb:g} MB component, 16 conns: mirror / nginx MB/s",
                        f"{m:.0f} / {n:.0f} = {m / n:.2f}x",
                    )
                )
                assert mirror.proc is not None
                workers = worker_pids(mirror.proc.pid, mirror_worker)
                sampler = PeakRss(workers)
                baseline = sampler.total()
                sampler.start()
                await run_wrk(mirror.url, paths, connections=50, seconds=args.seconds)
                peak = await sampler.stop()
                rows.append(
                    (
                        "mirror workers' RSS growth, 50 concurrent downloads",
                        f"{(peak - baseline) / 1e6:.1f} MB (of {baseline / 1e6:.0f} MB)",
                    )
                )
            finally:
                await mirror.stop()
                await nginx.stop()
            # --- cold install: direct vs through a cold mirror, 50 ms per dist request ---
            dist.delay = args.latency_ms / 1000
            direct, through = [], []
            for number in range(args.rounds):
                direct.append(await rustup_install(dist.url, work / f"direct-{number}"))
                cold = await start_mirror(work, dist, key, f"cache-cold-{number}")
                try:
                    through.append(await rustup_install(f"{cold.url}/toolchains", work / f"mirror-{number}"))
                finally:
                    await cold.stop()
            d, t = statistics.median(direct), statistics.median(through)
            rows.append((
                f"cold `rustup toolchain install` ({args.size_mb:g} MB rustc, {args.latency_ms:g} ms "
                "dist server): through the mirror / direct",
                f"{t:.2f}s / {d:.2f}s = {t / d:.2f}x",
            ))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = ["| toolchains | result |", "|---|---|", *(f"| {what} | {value} |" for what, value in rows)]
    return "\n".join(table) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.toolchains", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="size of the large component (100 MB)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per measurement (3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per wrk run (5)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added dist server latency (50)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "RESULTS-toolchains.md")
    args = parser.parse_args(argv)
    table = asyncio.run(run(args))
    print(table)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.output.write_text(
        f"# bench.toolchains ({stamp}, {os.cpu_count()} CPUs, rounds={args.rounds}, "
        f"{args.seconds:g}s wrk runs)\n\n" + table
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
