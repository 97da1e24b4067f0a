"""`python -m bench.scale` (or `python -m bench --scale`): how cratemirror behaves as the cache grows.

Fills one cache through the mirror (2 workers, fake upstream in its own process) up to each N in
--tiers (crate versions of `--versions-per-crate` tiny versions per crate) and at each N measures:
  fill rate (versions/s, 32 concurrent misses), /metrics time (median of 20 scrapes), hit p99 (16
  concurrent clients for --seconds), the operator tools' time and peak memory (verify, export of the
  whole cache, import of that bundle into an empty cache, prune --dry-run; medians of --tool-runs),
  restart time (spawn to the first hit answered), then eviction under load: the mirror restarted with
  cache.max_size 5 % below what it holds, a miss starts the eviction, and while it runs hits and misses
  continue: hit p99 during eviction, the longest wait of any request, how long the eviction took.

Not part of CI. Run from the repository root; to measure another checkout's code, run this file with a
Python whose `cratemirror` is that checkout (its children use `sys.executable`):
  python -m bench.scale --max-n 10000          # a quick run
  python -m bench.scale                        # 10k, 50k, 100k (long: see bench/README.md)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench import driver
from bench.catalog import Params, scale_name, scale_version
from bench.driver import Upstream, in_temp_dir, log
from bench.procs import rss_bytes
from tests.mirror_process import MirrorProcess, clean_env, metric_value

DEFAULT_TIERS = (10_000, 50_000, 100_000)
FILL_CONCURRENCY = 32
HIT_CONCURRENCY = 16
METRICS_SCRAPES = 20
EXTRA_VERSIONS = 5_000  # beyond the largest tier: the misses that run during eviction
EVICTION_TIMEOUT = 600.0
HUGE = "1TiB"


@dataclass
class Tier:
    n: int
    entries: int = 0
    fill_rate: float = 0.0
    metrics_ms: float = 0.0
    hit_p99_ms: float = 0.0
    restart_s: float = 0.0
    evict_hit_p99_ms: float = 0.0
    evict_longest_ms: float = 0.0
    evict_seconds: float = 0.0
    evicted: int = 0
    tools: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (seconds, peak MB)


@dataclass
class Scale:
    """Where the fill stands: versions are taken in order, crate by crate."""

    versions_per_crate: int
    filled: int = 0

    def key(self, index: int) -> tuple[str, str]:
        return scale_name(index // self.versions_per_crate), scale_version(index % self.versions_per_crate)


def url(name: str, version: str) -> str:
    return f"/api/v1/crates/{name}/{version}/download"


async def timed_get(session: aiohttp.ClientSession, base: str, path: str) -> float:
    started = time.perf_counter()
    async with session.get(base + path) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status}")
    return time.perf_counter() - started


async def fill(session: aiohttp.ClientSession, base: str, scale: Scale, upto: int) -> float:
    """Misses until `upto` versions were fetched; returns versions per second."""
    queue = iter(range(scale.filled, upto))
    started = time.perf_counter()

    async def worker() -> None:
        for index in queue:
            await timed_get(session, base, url(*scale.key(index)))

    await asyncio.gather(*(worker() for _ in range(FILL_CONCURRENCY)))
    count = upto - scale.filled
    scale.filled = upto
    return count / (time.perf_counter() - started)


async def hit_load(
    session: aiohttp.ClientSession, base: str, keys: Sequence[tuple[str, str]], stop: asyncio.Event
) -> list[tuple[float, float]]:
    """(start, latency) of every hit until `stop`."""
    samples: list[tuple[float, float]] = []
    rng = random.Random(1)

    async def worker() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            samples.append((started, await timed_get(session, base, url(*rng.choice(keys)))))

    await asyncio.gather(*(worker() for _ in range(HIT_CONCURRENCY)))
    return samples


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0


async def scrape(session: aiohttp.ClientSession, base: str) -> tuple[float, str]:
    started = time.perf_counter()
    async with session.get(f"{base}/metrics") as response:
        text = await response.text()
    return time.perf_counter() - started, text


def write_config(path: Path, max_size: str, cache: Path) -> Path:
    path.write_text(
        f"cache:\n  dir: {cache}\n  index_ttl: 1h\n  max_size: {max_size}\nlogging:\n  level: warning\n"
    )
    return path


def run_tool(argv: Sequence[str], cwd: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one `python -m cratemirror ...` run. The peak is the child's own
    VmHWM, sampled while it runs: wait4's ru_maxrss would count the memory of this (forking) process."""
    errors = cwd / "tool.err"
    started = time.perf_counter()
    with open(errors, "wb") as err:  # a file, not a pipe: nobody reads while it runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "cratemirror", *argv], cwd=cwd, env=clean_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_bytes(proc.pid, "VmHWM"))
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        tail = errors.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"cratemirror {' '.join(argv)} exited {proc.returncode}: {tail}")
    return elapsed, peak / 1024 / 1024


async def tools(tmp: Path, config: Path, cache: Path, runs: int) -> dict[str, tuple[float, float]]:
    results: dict[str, list[tuple[float, float]]] = {}
    bundle = tmp / "bundle.tar"
    for _ in range(runs):
        target = tmp / "imported"
        shutil.rmtree(target, ignore_errors=True)
        import_config = write_config(tmp / "import.yaml", HUGE, target)
        steps = {
            "verify": ["verify", "--config", str(config)],
            "export": ["export", str(bundle), "--config", str(config)],
            "import": ["import", str(bundle), "--config", str(import_config)],
            "prune --dry-run": ["prune", "--config", str(config), "--max-size", "1MiB", "--dry-run"],
        }
        for name, argv in steps.items():
            results.setdefault(name, []).append(await asyncio.to_thread(run_tool, argv, tmp))
        shutil.rmtree(target, ignore_errors=True)
        bundle.unlink(missing_ok=True)
    return {
        name: (statistics.median(t for t, _ in runs_), statistics.median(m for _, m in runs_))
        for name, runs_ in results.items()
    }


async def measure_tier(
    tier: Tier, scale: Scale, upstream: Upstream, tmp: Path, cache: Path, args: argparse.Namespace
) -> None:
    config = write_config(tmp / "mirror.yaml", HUGE, cache)
    mirror = MirrorProcess(upstream.index_url, cache, tmp, workers=2, extra_args=["--config", str(config)])
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=FILL_CONCURRENCY * 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await mirror.start()
        try:
            log(f"N={tier.n}: filling from {scale.filled}")
            tier.fill_rate = await fill(session, mirror.url, scale, tier.n)
            await upstream.requests()  # also empties the fake registry's request log
            times = [(await scrape(session, mirror.url))[0] for _ in range(METRICS_SCRAPES)]
            tier.metrics_ms = statistics.median(times) * 1000
            _, text = await scrape(session, mirror.url)
            held = int(metric_value(text, "cratemirror_cache_size_bytes", kind="crate"))
            tier.entries = int(metric_value(text, "cratemirror_cache_entries", kind="crate"))
            recent = [scale.key(i) for i in range(max(0, tier.n - 2000), tier.n)]
            stop = asyncio.Event()
            load = asyncio.create_task(hit_load(session, mirror.url, recent, stop))
            await asyncio.sleep(args.seconds)
            stop.set()
            tier.hit_p99_ms = p99([latency for _, latency in await load]) * 1000
        finally:
            await mirror.stop()

        log(f"N={tier.n}: tools")
        tier.tools = await tools(tmp, config, cache, args.tool_runs)

        max_size = int(held * 0.95)
        config = write_config(tmp / "mirror.yaml", str(max_size), cache)
        started = time.perf_counter()
        await mirror.start()
        try:
            await timed_get(session, mirror.url, url(*recent[-1]))
            tier.restart_s = time.perf_counter() - started
            log(f"N={tier.n}: eviction under load")
            await evict_under_load(tier, scale, session, mirror.url, recent, max_size)
        finally:
            await mirror.stop()


async def evict_under_load(
    tier: Tier,
    scale: Scale,
    session: aiohttp.ClientSession,
    base: str,
    recent: Sequence[tuple[str, str]],
    max_size: int,
) -> None:
    stop = asyncio.Event()
    misses: list[tuple[float, float]] = []

    async def miss_load() -> None:
        while not stop.is_set() and scale.filled < tier.n + EXTRA_VERSIONS:
            started = time.perf_counter()
            misses.append((started, await timed_get(session, base, url(*scale.key(scale.filled)))))
            scale.filled += 1

    load = asyncio.create_task(hit_load(session, base, recent, stop))
    missing = asyncio.create_task(miss_load())
    started = time.perf_counter()
    _, text = await scrape(session, base)
    before = metric_value(text, "cratemirror_cache_entries", kind="crate")
    ended = started + EVICTION_TIMEOUT
    while time.perf_counter() < started + EVICTION_TIMEOUT:
        await asyncio.sleep(0.1)
        _, text = await scrape(session, base)
        if metric_value(text, "cratemirror_cache_size_bytes", kind="crate") <= max_size:
            ended = time.perf_counter()
            break
    stop.set()
    hits = await load
    await missing
    tier.evict_seconds = ended - started
    tier.evicted = int(before - metric_value(text, "cratemirror_cache_entries", kind="crate"))
    during = [(s, lat) for s, lat in hits if started <= s <= ended]
    tier.evict_hit_p99_ms = p99([lat for _, lat in during]) * 1000
    everything = during + [(s, lat) for s, lat in misses if started <= s <= ended]
    tier.evict_longest_ms = max((lat for _, lat in everything), default=0.0) * 1000


def table(tiers: Sequence[Tier]) -> str:
    names = sorted({name for tier in tiers for name in tier.tools})
    rows: list[tuple[str, list[str]]] = [
        ("crate versions in the cache", [f"{t.entries}" for t in tiers]),
        ("fill rate (versions/s)", [f"{t.fill_rate:.0f}" for t in tiers]),
        ("hit p99 (ms)", [f"{t.hit_p99_ms:.1f}" for t in tiers]),
        ("hit p99 during eviction (ms)", [f"{t.evict_hit_p99_ms:.1f}" for t in tiers]),
        ("longest wait during eviction (ms)", [f"{t.evict_longest_ms:.0f}" for t in tiers]),
        ("eviction: crates / seconds", [f"{t.evicted} / {t.evict_seconds:.1f}" for t in tiers]),
        ("/metrics (ms, median)", [f"{t.metrics_ms:.1f}" for t in tiers]),
        ("restart to first hit (s)", [f"{t.restart_s:.2f}" for t in tiers]),
    ]
    for name in names:
        rows.append(
            (f"{name}: s / peak MB", [f"{t.tools[name][0]:.1f} / {t.tools[name][1]:.0f}" for t in tiers])
        )
    head = "| at N crate versions | " + " | ".join(f"{t.n // 1000}k" for t in tiers) + " |"
    lines = [head, "|---|" + "---|" * len(tiers)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


async def run(args: argparse.Namespace, tmp: Path) -> list[Tier]:
    tiers = [Tier(n) for n in args.tiers if n <= args.max_n]
    largest = max(t.n for t in tiers)
    crates = (largest + EXTRA_VERSIONS + args.versions_per_crate - 1) // args.versions_per_crate
    params = Params(cold_rounds=0, cold_keys=0, scale_crates=crates, scale_versions=args.versions_per_crate)
    driver.UPSTREAM_START_TIMEOUT = 900.0  # building 100k tarballs takes a while
    upstream = Upstream(tmp, params)
    await upstream.start()
    scale = Scale(args.versions_per_crate)
    cache = tmp / "cache"
    try:
        for tier in tiers:
            await measure_tier(tier, scale, upstream, tmp, cache, args)
            log(f"N={tier.n}: done\n{table([tier])}")
    finally:
        await upstream.stop()
    return tiers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-n", type=int, default=max(DEFAULT_TIERS), help="largest N to run")
    parser.add_argument(
        "--tiers", type=lambda text: tuple(int(n) for n in text.split(",")), default=DEFAULT_TIERS
    )
    parser.add_argument("--versions-per-crate", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="hit load per measurement")
    parser.add_argument("--tool-runs", type=int, default=1, help="runs per tool (medians)")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args(argv)
    if args.max_n < min(args.tiers):
        args.tiers = (args.max_n,)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tiers = in_temp_dir("cratemirror-scale-", "scale benchmark", args.keep_tmp, lambda tmp: run(args, tmp))
    if tiers is None:
        return 130
    text = table(tiers)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
