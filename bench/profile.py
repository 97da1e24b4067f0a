"""Where a warm hit's time goes: run the mirror (2 workers) against the bench's upstream, warm it, drive
one workload with wrk and record one worker with py-spy meanwhile; print the functions with the largest
share of the samples (inclusive and self).

    python -m bench.profile --workload index --seconds 10 [--raw out.txt]

Needs wrk and py-spy (`pip install py-spy`) on PATH; py-spy needs ptrace permission (root, or
kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import sys
import tempfile
from pathlib import Path

from bench import warm
from bench.catalog import Params, build
from bench.driver import MIRROR_WORKERS, Upstream, mirror_config, new_mirror
from bench.loadgen import run_wrk, write_paths
from bench.procs import mirror_worker, worker_pids


def summarise(raw: str, top: int) -> str:
    """py-spy's raw (collapsed) stacks -> the `top` functions by inclusive and by self share."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [frame.split(" (", 1)[0] + " " + _where(frame) for frame in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(lines)


def _where(frame: str) -> str:
    """`(path/to/module.py:123)` -> `module.py`."""
    inside = frame.partition(" (")[2].rstrip(")")
    return "(" + inside.rsplit("/", 1)[-1].split(":", 1)[0] + ")" if inside else ""


async def profile(workload: str, seconds: float, connections: int, raw_out: Path | None, top: int) -> str:
    params = Params(cold_rounds=0, cold_keys=0)
    catalog = build(params)
    paths = {
        "index": catalog.index_mix(),
        "small": catalog.small_crates(),
        "large": [catalog.large.download_path],
    }[workload]
    tmp = Path(tempfile.mkdtemp(prefix="cratemirror-profile-"))
    upstream = Upstream(tmp, params)
    await upstream.start()
    try:
        mirror = new_mirror(upstream, tmp, "mirror", mirror_config(tmp, 3600))
        await mirror.start()
        try:
            await warm.fill(mirror.url, paths)
            assert mirror.proc is not None
            pid = worker_pids(mirror.proc.pid, mirror_worker)[0]
            paths_file = write_paths(tmp / "paths.txt", paths)
            out = raw_out or tmp / "raw.txt"
            spy = await asyncio.create_subprocess_exec(
                "py-spy", "record", "--pid", str(pid), "--duration", str(max(1, int(seconds) - 1)),
                "--rate", "250", "--nonblocking", "--format", "raw", "-o", str(out),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            result = await run_wrk(mirror.url, paths_file, connections=connections, seconds=seconds)
            await asyncio.wait_for(spy.wait(), timeout=seconds + 30)
            rate = f"{result.rps:,.0f} req/s"
            head = f"{workload}: {rate}, {MIRROR_WORKERS} workers, p99 {result.p99_ms:.1f} ms"
            return head + "\n" + summarise(out.read_text(), top)
        finally:
            await mirror.stop()
    finally:
        await upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--workload", choices=("index", "small", "large"), default="index")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here")
    args = parser.parse_args(argv)
    for tool in ("wrk", "py-spy"):
        if shutil.which(tool) is None:
            print(f"missing: {tool}", file=sys.stderr)
            return 2
    print(asyncio.run(profile(args.workload, args.seconds, args.connections, args.raw, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
