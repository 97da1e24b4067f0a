"""Warm-cache workloads: fill both caches, then drive both servers with wrk, in turns."""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench import cpu
from bench.loadgen import WrkResult, run_wrk, write_paths


@dataclass(frozen=True)
class Workload:
    key: str  # index | small | large
    title: str
    paths: tuple[str, ...]
    connections: int


async def fill(base_url: str, paths: Sequence[str], concurrency: int = 8) -> collections.Counter[str]:
    """GET every path once (twice: the second pass must be all hits); returns the X-Cache values of the
    second pass."""
    seen: collections.Counter[str] = collections.Counter()
    semaphore = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    # No Accept-Encoding, exactly like wrk's requests.
    async with aiohttp.ClientSession(
        timeout=timeout, auto_decompress=False, skip_auto_headers=("Accept-Encoding",)
    ) as session:

        async def get(path: str, record: bool) -> None:
            async with semaphore, session.get(base_url + path) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"warm-up: {base_url}{path} answered {response.status}")
                if record:
                    seen[response.headers.get("X-Cache", "-")] += 1

        for record in (False, True):
            await asyncio.gather(*(get(path, record) for path in paths))
    return seen


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def drive(
    servers: dict[str, str],
    pids: dict[str, int],
    workloads: Sequence[Workload],
    *,
    rounds: int,
    seconds: float,
    warmup_seconds: float,
    quiet_budget: float,
    tmp: Path,
) -> dict[str, dict[str, list[WrkResult]]]:
    """For each workload: a short unrecorded run per server, then `rounds` rounds in which every server
    gets one run (the order alternates between rounds, so neither always runs on a warmer machine)."""
    results: dict[str, dict[str, list[WrkResult]]] = {}
    names = list(servers)
    for workload in workloads:
        paths_file = write_paths(tmp / f"paths-{workload.key}.txt", workload.paths)
        per_server: dict[str, list[WrkResult]] = {name: [] for name in names}
        for name in names:
            await run_wrk(servers[name], paths_file, connections=workload.connections, seconds=warmup_seconds)
        for rnd in range(rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for name in order:
                await cpu.wait_for_quiet(budget=quiet_budget)
                result = await run_wrk(
                    servers[name], paths_file, connections=workload.connections, seconds=seconds,
                    server_pid=pids.get(name),
                )  # fmt: skip
                per_server[name].append(result)
                log(
                    f"  {workload.key:<6} round {rnd + 1}/{rounds} {name:<11} {result.rps:9.0f} req/s "
                    f"{result.mb_per_s:8.1f} MB/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
                    + f"  cpu {result.cpu_us_per_request:6.1f} us/req  others {result.others:4.0%}"
                    + (f"  ERRORS {result.errors}" if result.errors else "")
                )
        results[workload.key] = per_server
    return results
