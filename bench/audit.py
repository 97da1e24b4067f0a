"""`python -m bench.audit`: what the audit trail costs the hit path.

Two mirrors (2 workers each, fresh cache dirs, the bench's fake upstream in its own process, logging at
info with the access log on, as the main bench and the default config run), the same config but
`audit.retention: 90d` (on, the default) and `audit.retention: 0` (off). Both are warmed with the 100
small crates, then wrk drives warm small-crate hits (every one a download, so every one is
recorded) at one and then the other, alternating which goes first, for `--rounds` rounds in the same
run. Prints the medians (req/s, p50, p99, and the CPU time the worker processes spent per request, read
from /proc: the figure least disturbed by other load on the machine) and on/off ratios, and how many
records the trail holds afterwards (so the "on" run did record). Needs wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

from bench.catalog import Params, build
from bench.driver import Upstream, new_mirror
from bench.loadgen import WrkResult, run_wrk, write_paths
from bench.procs import mirror_worker, worker_pids
from bench.warm import fill

MODES = ("off", "on")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
Results = dict[str, list[tuple[WrkResult, float]]]  # per mode: (wrk's numbers, worker CPU ms per request)


def cpu_seconds(parent: int) -> float:
    """user + system CPU time of the mirror's worker processes (and any threads they run)."""
    total = 0
    for pid in worker_pids(parent, mirror_worker):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def log(message: str) -> None:
    print(f"bench.audit: {message}", file=sys.stderr, flush=True)


async def run(rounds: int, seconds: float, connections: int, tmp: Path) -> tuple[Results, int]:
    catalog = build(Params())
    upstream = Upstream(tmp, Params())
    await upstream.start()
    results: Results = {mode: [] for mode in MODES}
    records = 0
    try:
        await upstream.set_delay(0)
        mirrors = {}
        for mode in MODES:
            config = tmp / f"{mode}.yaml"
            retention = "90d" if mode == "on" else "0"
            config.write_text(
                f"cache:\n  index_ttl: 3600s\naudit:\n  retention: {retention}\nlogging:\n  level: info\n"
            )
            mirrors[mode] = new_mirror(upstream, tmp, f"mirror-{mode}", config)
        paths = catalog.small_crates()
        paths_file = write_paths(tmp / "paths.txt", paths)
        for mirror in mirrors.values():
            await mirror.start()
        try:
            for mode, mirror in mirrors.items():
                seen = await fill(mirror.url, paths)
                log(f"warmed audit {mode}: second pass X-Cache {dict(seen)}")
                await run_wrk(mirror.url, paths_file, connections=connections, seconds=1)  # warm-up
            for n in range(rounds):
                order = MODES if n % 2 == 0 else MODES[::-1]
                for mode in order:
                    proc = mirrors[mode].proc
                    assert proc is not None
                    before = cpu_seconds(proc.pid)
                    result = await run_wrk(
                        mirrors[mode].url, paths_file, connections=connections, seconds=seconds
                    )
                    per_request = (cpu_seconds(proc.pid) - before) * 1e3 / max(1, result.requests)
                    results[mode].append((result, per_request))
                    log(
                        f"round {n + 1} audit {mode}: {result.rps:.0f} req/s, p50 {result.p50_ms:.2f} ms, "
                        f"p99 {result.p99_ms:.2f} ms, {per_request * 1e3:.0f} us CPU/request, "
                        f"{result.errors} errors, others' CPU {result.others:.0%}"
                    )
        finally:
            for mirror in mirrors.values():
                await mirror.stop()
        database = mirrors["on"].cache_dir / "audit.sqlite"
        with sqlite3.connect(database) as db:
            records = int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    finally:
        await upstream.stop()
    return results, records


def table(results: Results, records: int, connections: int) -> str:
    def median(mode: str, field: str) -> float:
        if field == "cpu_us":
            return statistics.median(cpu * 1e3 for _, cpu in results[mode])
        return float(statistics.median(getattr(result, field) for result, _ in results[mode]))

    lines = [
        f"audit trail on the hit path: warm small-crate downloads, {connections} connections, "
        f"median of {len(results['on'])} rounds (same run, alternating order)",
        f"{'':14} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'worker CPU us/req':>18}",
    ]
    fields = ("rps", "p50_ms", "p99_ms", "cpu_us")
    for mode in MODES:
        rps, p50, p99, cpu = (median(mode, field) for field in fields)
        lines.append(f"{'audit ' + mode:14} {rps:9.0f} {p50:8.2f} {p99:8.2f} {cpu:18.0f}")
    ratios = [median("on", field) / median("off", field) for field in fields]
    lines.append(f"{'on / off':14} {ratios[0]:9.3f} {ratios[1]:8.3f} {ratios[2]:8.3f} {ratios[3]:18.3f}")
    lines.append(f"records in the trail afterwards: {records}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        log("missing: wrk (apt-get install -y wrk)")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="cratemirror-bench-audit-"))
    try:
        results, records = asyncio.run(run(args.rounds, args.duration, args.connections, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(results, records, args.connections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
