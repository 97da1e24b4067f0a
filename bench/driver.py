"""The benchmark driver: start the upstream, cratemirror and nginx, run every workload, report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp

from bench import cargo, cold, memory, report, warm
from bench.catalog import Catalog, Params, build
from bench.nginx import Nginx, nginx_binary
from bench.procs import Child, mirror_worker, nginx_worker
from bench.trivial import Trivial
from tests.mirror_process import MirrorProcess, clean_env

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
# A run writes here unless told otherwise: untracked (.gitignore), so trying the bench never dirties the
# checkout. `--write-results` updates the committed table instead.
LOCAL_RESULTS = REPO / "bench" / "RESULTS.local.md"
COMMITTED_RESULTS = REPO / "bench" / "RESULTS.md"
WORKLOADS = ("index", "small", "large", "cold", "cargo", "memory")
UPSTREAM_START_TIMEOUT = 120.0
MIRROR_WORKERS = 2
INSTALL_HINT = "apt-get install -y nginx wrk   (cargo: https://rustup.rs, or apt-get install -y cargo)"


@dataclass(frozen=True)
class Settings:
    mode: str
    rounds: int
    seconds: float
    warmup_seconds: float
    connections: int
    large_connections: int
    cold_keys: int
    cargo_rounds: int
    latency: float
    slow_clients: int
    index_ttl: int
    large_size: int
    workloads: tuple[str, ...]
    output: Path
    keep_tmp: bool


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark cratemirror against nginx proxy_cache and against the upstream directly.",
    )
    parser.add_argument("--quick", action="store_true", help="short runs (about 2 minutes in all)")
    parser.add_argument("--rounds", type=int, help="rounds per warm workload (default 3)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10; quick 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections, index/small (64)")
    parser.add_argument("--large-connections", type=int, default=16, help="wrk connections, large crate (16)")
    parser.add_argument("--cold-keys", type=int, help="cold-miss keys per round (default 10; quick 5)")
    parser.add_argument("--cargo-rounds", type=int, help="cargo fetch rounds (default 3; quick 1)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added upstream latency (50)")
    parser.add_argument("--slow-clients", type=int, default=100, help="slow clients in the memory test")
    parser.add_argument("--large-mib", type=float, default=3.0, help="size of the large crate (3 MiB)")
    parser.add_argument(
        "--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help=f"results file (default {LOCAL_RESULTS.relative_to(REPO)})"
    )
    parser.add_argument(
        "--write-results",
        action="store_true",
        help=f"update the committed {COMMITTED_RESULTS.relative_to(REPO)} (default: an untracked file)",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs)")
    args = parser.parse_args(argv)
    workloads = tuple(w.strip() for w in args.only.split(",") if w.strip())
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"--only: unknown workload(s) {', '.join(sorted(unknown))}")
    quick = bool(args.quick)
    rounds = args.rounds if args.rounds is not None else 3
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    return Settings(
        mode="quick" if quick else "full",
        rounds=rounds,
        seconds=args.duration if args.duration is not None else (3.0 if quick else 10.0),
        warmup_seconds=1.0 if quick else 2.0,
        connections=args.connections,
        large_connections=args.large_connections,
        cold_keys=args.cold_keys if args.cold_keys is not None else (5 if quick else 10),
        cargo_rounds=args.cargo_rounds if args.cargo_rounds is not None else (1 if quick else 3),
        latency=args.latency_ms / 1000,
        slow_clients=args.slow_clients,
        index_ttl=3600,
        large_size=int(args.large_mib * 1024 * 1024),
        workloads=workloads,
        output=results_path(args.output, bool(args.write_results), parser),
        keep_tmp=bool(args.keep_tmp),
    )


def results_path(output: Path | None, write_results: bool, parser: argparse.ArgumentParser) -> Path:
    if output is not None and write_results:
        parser.error("--output and --write-results: choose one")
    if write_results:
        return COMMITTED_RESULTS
    return output if output is not None else LOCAL_RESULTS


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def missing_tools(workloads: tuple[str, ...]) -> list[str]:
    missing: list[str] = []
    if {"index", "small", "large"} & set(workloads) and shutil.which("wrk") is None:
        missing.append("wrk")
    if {"index", "small", "large", "memory"} & set(workloads) and nginx_binary() is None:
        missing.append("nginx")
    if "cargo" in workloads and shutil.which("cargo") is None:
        missing.append("cargo")
    return missing


# ---- the upstream ------------------------------------------------------------------------------------


class Upstream:
    """The fake registry process and its control server."""

    def __init__(self, tmp: Path, params: Params) -> None:
        argv = [sys.executable, "-m", "bench.upstream", json.dumps(asdict(params))]
        self.child = Child("upstream", argv, tmp / "upstream.log", REPO, clean_env())
        self.url = self.index_url = self.control = ""

    async def start(self) -> None:
        await self.child.start(stdout_pipe=True)
        proc = self.child.proc
        assert proc is not None and proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=UPSTREAM_START_TIMEOUT)
        except TimeoutError:
            line = b""
        if not line:
            raise RuntimeError(f"the upstream did not start:\n{self.child.output()}")
        info = json.loads(line)
        self.url, self.index_url, self.control = info["url"], info["index_url"], info["control"]
        log(f"upstream on {self.url}: {info['versions']} crate versions")

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.url.removeprefix("http://").rpartition(":")
        return host, int(port)

    async def set_delay(self, seconds: float) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.control}/delay", params={"seconds": str(seconds)}) as response,
        ):
            response.raise_for_status()

    async def requests(self) -> int:
        async with aiohttp.ClientSession() as session, session.get(f"{self.control}/stats") as response:
            response.raise_for_status()
            data = await response.json()
        return int(data["requests"])

    async def stop(self) -> None:
        await self.child.stop()


def mirror_config(tmp: Path, index_ttl: int) -> Path:
    """The bench's mirror.yaml: defaults, except an index TTL long enough that warm runs are pure hits
    (nginx gets the same TTL)."""
    path = tmp / "mirror.yaml"
    path.write_text(f"cache:\n  index_ttl: {index_ttl}s\nlogging:\n  level: info\n")
    return path


def new_mirror(upstream: Upstream, tmp: Path, name: str, config: Path) -> MirrorProcess:
    workdir = tmp / name
    workdir.mkdir(parents=True, exist_ok=True)
    return MirrorProcess(
        upstream.index_url, workdir / "cache", workdir, workers=MIRROR_WORKERS,
        extra_args=["--config", str(config)],
    )  # fmt: skip


# ---- phases ------------------------------------------------------------------------------------------


async def warm_phase(
    s: Settings, catalog: Catalog, upstream: Upstream, tmp: Path, config: Path, raw: report.Raw
) -> None:
    specs = {
        "index": warm.Workload(
            "index", f"warm index hits ({len(catalog.index_mix())} files, {s.connections} conns)",
            tuple(catalog.index_mix()), s.connections,
        ),
        "small": warm.Workload(
            "small", f"warm small-crate hits ({len(catalog.small_crates())} crates, {s.connections} conns)",
            tuple(catalog.small_crates()), s.connections,
        ),
        "large": warm.Workload(
            "large", f"warm large-crate hits ({s.large_size / 2**20:.1f} MiB, {s.large_connections} conns)",
            (catalog.large.download_path,), s.large_connections,
        ),
    }  # fmt: skip
    workloads = [specs[key] for key in specs if key in s.workloads]
    await upstream.set_delay(0)
    mirror = new_mirror(upstream, tmp, "mirror-warm", config)
    host, port = upstream.host_port
    nginx = Nginx(tmp / "nginx-warm", host, port, s.index_ttl)
    async with contextlib.AsyncExitStack() as stack:
        await mirror.start()
        stack.push_async_callback(mirror.stop)
        await nginx.start()
        stack.push_async_callback(nginx.stop)
        all_paths = [p for w in workloads for p in w.paths]
        for name, url in {"cratemirror": mirror.url, "nginx": nginx.url}.items():
            raw.warm_x_cache[name] = dict(await warm.fill(url, all_paths))
            log(f"warmed {name}: second pass X-Cache {raw.warm_x_cache[name]}")
        # The stack's ceiling: the same bytes from a dict, same worker count and event loop.
        trivial = Trivial(tmp, MIRROR_WORKERS)
        await trivial.copy_answers(mirror.url, all_paths)
        await trivial.start()
        stack.push_async_callback(trivial.stop)
        servers = {"cratemirror": mirror.url, "trivial": trivial.url, "nginx": nginx.url}
        before = await upstream.requests()
        assert mirror.proc is not None
        pids = {"cratemirror": mirror.proc.pid, "trivial": trivial.pid, "nginx": nginx.pid}
        raw.warm = await warm.drive(
            servers,
            pids,
            workloads,
            rounds=s.rounds,
            seconds=s.seconds,
            warmup_seconds=s.warmup_seconds,
            quiet_budget=3.0 if s.mode == "quick" else 10.0,
            tmp=tmp,
        )
        raw.warm_upstream_requests["both servers"] = await upstream.requests() - before
        raw.warm_titles = {w.key: w.title for w in workloads}


async def cold_phase(
    s: Settings, catalog: Catalog, upstream: Upstream, tmp: Path, config: Path, raw: report.Raw
) -> None:
    await upstream.set_delay(s.latency)
    mirror = new_mirror(upstream, tmp, "mirror-cold", config)
    await mirror.start()
    try:
        await cold.warm_up(mirror.url, catalog.cold_warmup)
        for rnd in range(s.rounds):
            result = await cold.cold_round(mirror.url, upstream.url, catalog.cold[rnd], rnd % 2 == 0)
            raw.cold.append(result)
            log(
                f"  cold   round {rnd + 1}/{s.rounds} "
                + "  ".join(
                    f"{kind} {side} {t.ttfb * 1e3:.1f}/{t.total * 1e3:.1f} ms"
                    for kind, sides in result.items()
                    for side, t in sides.items()
                )
            )
    finally:
        await mirror.stop()
    raw.cold_title = f"cold miss (+{s.latency * 1e3:.0f} ms upstream, {s.cold_keys} keys/round)"


async def cargo_phase(
    s: Settings, catalog: Catalog, upstream: Upstream, tmp: Path, config: Path, raw: report.Raw
) -> None:
    await upstream.set_delay(s.latency)
    deps = catalog.root_deps()
    expect = len(catalog.tree) + 1
    raw.cargo = {"direct": [], "cold": [], "warm": []}
    for rnd in range(s.cargo_rounds):
        base = tmp / f"cargo-{rnd}"
        raw.cargo["direct"].append(await cargo.cargo_fetch(upstream.index_url, base / "direct", deps, expect))
        mirror = new_mirror(upstream, tmp, f"mirror-cargo-{rnd}", config)
        await mirror.start()
        try:
            index = f"{mirror.url}/index/"
            raw.cargo["cold"].append(await cargo.cargo_fetch(index, base / "cold", deps, expect))
            raw.cargo["warm"].append(await cargo.cargo_fetch(index, base / "warm", deps, expect))
        finally:
            await mirror.stop()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(mirror.workdir, ignore_errors=True)
        log(
            f"  cargo  round {rnd + 1}/{s.cargo_rounds} direct {raw.cargo['direct'][-1]:.2f} s, "
            f"cold mirror {raw.cargo['cold'][-1]:.2f} s, warm mirror {raw.cargo['warm'][-1]:.2f} s"
        )
    raw.cargo_title = (
        f"cargo fetch, {len(catalog.tree)} crates (+{s.latency * 1e3:.0f} ms upstream, fresh CARGO_HOME)"
    )


async def memory_phase(
    s: Settings, catalog: Catalog, upstream: Upstream, tmp: Path, config: Path, raw: report.Raw
) -> None:
    await upstream.set_delay(0)
    path = catalog.large.download_path
    prime = [catalog.tree[0].index_url_path, catalog.tree[0].download_path]
    mirror = new_mirror(upstream, tmp, "mirror-memory", config)
    await mirror.start()
    try:
        await warm.fill(mirror.url, prime)
        assert mirror.proc is not None
        raw.memory["cratemirror"] = await memory.measure(
            mirror.proc.pid, mirror_worker, mirror.port, path, s.slow_clients
        )
    finally:
        await mirror.stop()
    if nginx_binary() is not None:
        host, port = upstream.host_port
        nginx = Nginx(tmp / "nginx-memory", host, port, s.index_ttl)
        await nginx.start()
        try:
            await warm.fill(nginx.url, prime)
            raw.memory["nginx"] = await memory.measure(
                nginx.pid, nginx_worker, nginx.port, path, s.slow_clients
            )
        finally:
            await nginx.stop()
    for server, m in raw.memory.items():
        log(
            f"  memory {server:<11} cold +{m.cold_growth / 2**20:.1f} MiB ({m.cold_seconds:.1f} s), "
            f"warm +{m.warm_growth / 2**20:.1f} MiB ({m.warm_seconds:.1f} s)"
        )
    raw.memory_title = (
        f"memory: {s.slow_clients} slow clients on the {s.large_size / 2**20:.1f} MiB crate (sum of workers)"
    )


async def run(s: Settings, tmp: Path) -> report.Raw:
    params = Params(large_size=s.large_size, cold_rounds=s.rounds, cold_keys=s.cold_keys)
    catalog = build(params)
    raw = report.Raw()
    config = mirror_config(tmp, s.index_ttl)
    upstream = Upstream(tmp, params)
    await upstream.start()
    try:
        phases = [
            ({"index", "small", "large"}, warm_phase, "warm hits (wrk)"),
            ({"cold"}, cold_phase, "cold misses"),
            ({"cargo"}, cargo_phase, "cargo fetch"),
            ({"memory"}, memory_phase, "memory under slow clients"),
        ]
        for keys, phase, title in phases:
            if keys & set(s.workloads):
                started = time.monotonic()
                log(f"== {title}")
                await phase(s, catalog, upstream, tmp, config, raw)
                log(f"   ({time.monotonic() - started:.0f} s)")
    finally:
        await upstream.stop()
    return raw


# ---- report ------------------------------------------------------------------------------------------


def _command_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> list[str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nginx = nginx_binary() or "nginx"
    wrk = _command_version(["wrk", "-v"]).split(" Copyright")[0]
    return [
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- machine: {os.cpu_count()} CPUs ({model}), Linux {platform.release()}; the load generator "
        "and every server share these CPUs",
        f"- python {platform.python_version()}, cratemirror {_package_version('cratemirror')}, "
        f"aiohttp {_package_version('aiohttp')}, uvloop {_package_version('uvloop')}",
        f"- {_command_version([nginx, '-v']).removeprefix('nginx version: ')}, "
        f"{wrk}, {_command_version(['cargo', '--version'])}",
    ]


def settings_line(s: Settings) -> str:
    return (
        f"- mode {s.mode}: {s.rounds} rounds of {s.seconds:g} s per wrk run (wrk -t2, after a "
        f"{s.warmup_seconds:g} s unrecorded run), {s.cold_keys} cold keys per round, {s.cargo_rounds} "
        f"cargo round(s), cratemirror and the trivial aiohttp server (uvloop) with 2 workers each, "
        f"nginx with 2 worker processes, index TTL {s.index_ttl} s on both caches"
    )


NOTES = """\
How to read it: for warm hits there are two baselines: "trivial aiohttp" (the same bytes from a dict,
aiohttp on uvloop with the mirror's worker count: the serving stack's ceiling) and nginx (proxy_cache);
for memory nginx, and the upstream asked directly for cold misses and cargo. Ratios are
cratemirror / baseline (for cargo: how many times faster than direct). "CPU µs/request" is the CPU
time of the server's processes during the run divided by the requests answered: less sensitive to
other load on the machine than requests per second. Every number is the median over the rounds; the
per-round numbers are below.
Cold-miss requests are timed to the response headers (TTFB) and to the last byte; the crate is asked
for after its index file, as cargo does, so the mirror already holds the checksum. Memory is the peak
of the summed RSS of the worker processes minus its value before the cold phase, sampled every 20 ms,
while each client reads 16 KiB per 20 ms through a 16 KiB receive buffer."""


def render(s: Settings, raw: report.Raw, elapsed: float) -> str:
    lines = [
        "# cratemirror benchmark results",
        "",
        "Produced by `python -m bench` (see bench/README.md); this file is overwritten by every run.",
        "",
        *machine(),
        settings_line(s),
        f"- total run time {elapsed / 60:.1f} min",
        "",
        "## Results (median of the rounds)",
        "",
        report.table(report.rows(raw)),
        "",
        NOTES,
        "",
    ]
    if raw.warm:
        shares = [r.others for runs in raw.warm.values() for results in runs.values() for r in results]
        lines += [
            f"Other people's processes used a median {statistics.median(shares):.0%} (at most "
            f"{max(shares):.0%}) of the CPUs during the wrk runs (each run waits up to 10 s for a quiet "
            'machine first); see "others" per round below.',
            "",
        ]
        lines += [
            f"Upstream requests during the warm wrk runs: {raw.warm_upstream_requests.get('both servers')} "
            f"(0 = pure cache hits). X-Cache of the verification pass: {raw.warm_x_cache}.",
            "",
        ]
    lines += ["## Per round", "", report.raw_section(raw), ""]
    return "\n".join(lines)


def in_temp_dir(prefix: str, what: str, keep: bool, work: Callable[[Path], Awaitable[T]]) -> T | None:
    """Run `work` in a fresh temp dir (removed afterwards unless `keep`); None if interrupted (Ctrl-C
    or SIGTERM), after every process it started was stopped."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    log(f"{what}; temp dir {tmp}")

    async def guarded() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await work(tmp)

    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; every process started was stopped")
        return None
    finally:
        if keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    missing = missing_tools(s.workloads)
    if missing:
        log(f"missing: {', '.join(missing)}. Install them first, e.g.\n  {INSTALL_HINT}")
        return 2
    started = time.monotonic()
    raw = in_temp_dir("cratemirror-bench-", f"benchmark ({s.mode})", s.keep_tmp, lambda tmp: run(s, tmp))
    if raw is None:
        return 130
    text = render(s, raw, time.monotonic() - started)
    print(report.table(report.rows(raw)))
    s.output.write_text(text)
    log(f"wrote {s.output} ({(time.monotonic() - started) / 60:.1f} min)")
    return 0
