"""Child processes of the benchmark (each in its own session, so a stop reaches the whole group) and
memory sampling from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

STOP_TIMEOUT = 15.0


class Child:
    """One long-running helper process (the upstream, nginx) with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, cwd: Path, env: dict[str, str]):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self, tail: int = 4000) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")[-tail:]
        return ""

    async def start(self, *, stdout_pipe: bool = False) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=str(self.cwd),
                env=self.env,
                stdin=asyncio.subprocess.PIPE,  # closed by stop(): the upstream exits on EOF too
                stdout=asyncio.subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """`sig` to the process group, then SIGKILL after STOP_TIMEOUT; always reaps."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=STOP_TIMEOUT)
        # Anything left in the group (a worker that outlived its master) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            await proc.wait()


# ---- memory ------------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of `pid` (scans /proc: /proc/PID/task/*/children is not always compiled in)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            # The command name is in parentheses and may contain spaces: split after the last ')'.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of /proc/PID/status in bytes (VmHWM: the peak); 0 once the process is gone."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def worker_pids(parent: int, is_worker: Callable[[str], bool]) -> list[int]:
    return [pid for pid in children(parent) if is_worker(cmdline(pid))]


def mirror_worker(command: str) -> bool:
    # multiprocessing's spawn workers; not its resource tracker.
    return "spawn_main" in command and "resource_tracker" not in command


def nginx_worker(command: str) -> bool:
    return "worker process" in command


class LocalServer:
    """A reference server the bench runs on loopback as a Child (trivial, nginx): where, and which pid."""

    port: int
    child: Child

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.child.pid


class PeakRss:
    """Samples the summed RSS of a fixed set of processes until stopped; bounded in samples."""

    def __init__(self, pids: Sequence[int], interval: float = 0.02, max_samples: int = 30_000) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.max_samples = max_samples
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def total(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids)

    async def _run(self) -> None:
        for _ in range(self.max_samples):
            self.peak = max(self.peak, self.total())
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.peak = self.total()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> int:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.peak = max(self.peak, self.total())
        return self.peak
