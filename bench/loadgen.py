"""wrk as the load generator: one run = one server, one workload, a fixed duration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import cpu

LUA = Path(__file__).with_name("rotate.lua")
_MARK = "BENCHJSON "


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    errors: int  # socket errors (connect/read/write/timeout) and non-2xx/3xx answers
    p50_ms: float
    p99_ms: float
    others: float = 0.0  # share of the CPUs used by other people's processes during the run
    server_cpu: float = 0.0  # CPU seconds the server's processes used during the run (0: not measured)

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu / self.requests * 1e6 if self.requests else 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0


def write_paths(path: Path, paths: Sequence[str]) -> Path:
    path.write_text("".join(f"{p}\n" for p in paths))
    return path


async def run_wrk(
    base_url: str,
    paths_file: Path,
    *,
    connections: int,
    seconds: float,
    threads: int = 2,
    server_pid: int | None = None,
) -> WrkResult:
    argv = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--timeout", "10s", "--latency", "-s", str(LUA), base_url, "--", str(paths_file),
    ]  # fmt: skip
    before = cpu.snapshot()
    server_before = cpu.tree_seconds(server_pid) if server_pid is not None else 0.0
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 60)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    others = cpu.others_share(before, cpu.snapshot())
    server_cpu = cpu.tree_seconds(server_pid) - server_before if server_pid is not None else 0.0
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith(_MARK)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    data = json.loads(line.removeprefix(_MARK))
    errors = sum(int(data[key]) for key in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        requests=int(data["requests"]),
        seconds=int(data["duration_us"]) / 1e6,
        bytes=int(data["bytes"]),
        errors=errors,
        p50_ms=int(data["p50_us"]) / 1e3,
        p99_ms=int(data["p99_us"]) / 1e3,
        others=others,
        server_cpu=server_cpu,
    )
