"""How busy the machine was with work that is not the benchmark's: other people's jobs on the same
CPUs make a run slower, and the report should say when that happened."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Snapshot:
    busy: int  # all CPUs, non-idle jiffies
    total: int  # all CPUs, all jiffies
    ours: int  # jiffies used by this process and its descendants, alive or reaped


def _machine() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime + stime + cutime + cstime) for every process."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            # After the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15), 0-based here.
            table[int(entry.name)] = (int(fields[1]), sum(int(fields[i]) for i in (11, 12, 13, 14)))
    return table


def snapshot() -> Snapshot:
    busy, total = _machine()
    table = _processes()
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ours = 0
    stack = list(children.get(me, []))
    for _ in range(len(table)):  # bounded walk of the process tree
        if not stack:
            break
        pid = stack.pop()
        ours += table[pid][1]
        stack.extend(children.get(pid, []))
    t = os.times()
    ours += round((t.user + t.system + t.children_user + t.children_system) * TICKS)
    return Snapshot(busy, total, ours)


def tree_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by `root` and its descendants: a server's cost per
    request, which other people's load on the CPUs changes far less than its requests per second."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ticks = 0
    stack = [root]
    for _ in range(len(table) + 1):  # bounded walk of the process tree
        if not stack:
            break
        pid = stack.pop()
        ticks += table.get(pid, (0, 0))[1]
        stack.extend(children.get(pid, []))
    return ticks / TICKS


def others_share(before: Snapshot, after: Snapshot) -> float:
    """The share of the machine's CPU time (0..1) used by processes that are not ours."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    foreign = (after.busy - before.busy) - (after.ours - before.ours)
    return min(1.0, max(0.0, foreign / total))


async def wait_for_quiet(threshold: float = 0.15, window: float = 0.5, budget: float = 10.0) -> float:
    """Wait (at most `budget` seconds) for a `window` in which others use under `threshold` of the
    CPUs; returns the share seen in the last window."""
    share = 1.0
    for _ in range(max(1, int(budget / window))):
        before = snapshot()
        await asyncio.sleep(window)
        share = others_share(before, snapshot())
        if share < threshold:
            break
    return share
