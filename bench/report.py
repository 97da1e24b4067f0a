"""Turn raw per-round numbers into the results table (medians, ratios, targets) and RESULTS.md."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.cold import Timing
from bench.loadgen import WrkResult
from bench.memory import MemoryResult

MIB = 1024 * 1024
MEMORY_TARGET = 64 * MIB


@dataclass
class Raw:
    """Everything measured; a workload that was not run stays empty."""

    warm: dict[str, dict[str, list[WrkResult]]] = field(default_factory=dict)
    warm_titles: dict[str, str] = field(default_factory=dict)
    warm_upstream_requests: dict[str, int] = field(default_factory=dict)  # during the wrk runs
    warm_x_cache: dict[str, dict[str, int]] = field(default_factory=dict)
    cold: list[dict[str, dict[str, Timing]]] = field(default_factory=list)  # one per round
    cold_title: str = ""
    cargo: dict[str, list[float]] = field(default_factory=dict)  # direct | cold | warm -> seconds
    cargo_title: str = ""
    memory: dict[str, MemoryResult] = field(default_factory=dict)
    memory_title: str = ""


@dataclass(frozen=True)
class Row:
    workload: str
    metric: str
    mirror: str
    baseline: str
    ratio: str
    target: str
    met: str


def _med(values: Sequence[float]) -> float:
    return statistics.median(values)


def _verdict(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


# Warm-hit targets per workload and baseline (issue 5: against nginx; issue 24: against the trivial
# aiohttp handler, the serving stack's ceiling).
WARM_TARGETS: dict[tuple[str, str, str], float] = {
    ("index", "trivial", "req/s"): 0.8,
    ("small", "trivial", "req/s"): 0.8,
    ("index", "nginx", "req/s"): 0.5,
    ("small", "nginx", "req/s"): 0.5,
    ("large", "nginx", "MB/s"): 0.9,
    ("index", "nginx", "p99 latency"): 3.0,
    ("small", "nginx", "p99 latency"): 3.0,
}
BASELINE_NAMES = {"trivial": "trivial aiohttp", "nginx": "nginx"}


def _warm_rows(key: str, title: str, runs: dict[str, list[WrkResult]]) -> list[Row]:
    mine = runs["cratemirror"]
    rows: list[Row] = []

    def ratio_row(
        baseline: str, metric: str, get: Callable[[WrkResult], float], fmt: str, higher: bool
    ) -> None:
        theirs = runs.get(baseline)
        if not theirs:
            return
        a, b = _med([get(r) for r in mine]), _med([get(r) for r in theirs])
        ratio = a / b if b else float("inf")
        target = WARM_TARGETS.get((key, baseline, metric))
        target_text = "" if target is None else (f"≥ {target:g}" if higher else f"≤ {target:g}")
        met = "" if target is None else _verdict(ratio >= target if higher else ratio <= target)
        rows.append(Row(title if not rows else "", f"{metric} vs {BASELINE_NAMES[baseline]}", fmt.format(a),
                        fmt.format(b), f"{ratio:.2f}", target_text, met))  # fmt: skip

    for baseline in ("trivial", "nginx"):
        if key == "large":
            ratio_row(baseline, "MB/s", lambda r: r.mb_per_s, "{:,.0f}", True)
        else:
            ratio_row(baseline, "req/s", lambda r: r.rps, "{:,.0f}", True)
    if all(r.server_cpu for r in mine):
        for baseline in ("trivial", "nginx"):
            ratio_row(baseline, "CPU µs/request", lambda r: r.cpu_us_per_request, "{:.1f}", False)
    for baseline in ("trivial", "nginx"):
        ratio_row(baseline, "p50 latency", lambda r: r.p50_ms, "{:.2f} ms", False)
        ratio_row(baseline, "p99 latency", lambda r: r.p99_ms, "{:.2f} ms", False)
    return rows


def _timing(t: Timing, metric: str) -> float:
    return t.ttfb if metric == "TTFB" else t.total


def _cold_rows(title: str, rounds: list[dict[str, dict[str, Timing]]]) -> list[Row]:
    rows: list[Row] = []
    for kind, label in (("index", "index file"), ("crate", "crate (index cached)")):
        for metric in ("TTFB", "total"):
            a = _med([_timing(r[kind]["cratemirror"], metric) for r in rounds])
            b = _med([_timing(r[kind]["direct"], metric) for r in rounds])
            ratio = a / b
            rows.append(
                Row(title if not rows else "", f"{label}: {metric}", _ms(a), f"{_ms(b)} (direct)",
                    f"{ratio:.2f}", "≤ 1.1", _verdict(ratio <= 1.1))
            )  # fmt: skip
    return rows


def _cargo_rows(title: str, runs: dict[str, list[float]]) -> list[Row]:
    direct = _med(runs["direct"])
    cold, warm = _med(runs["cold"]), _med(runs["warm"])
    return [
        Row(title, "via cold mirror", f"{cold:.2f} s", f"{direct:.2f} s (direct)",
            f"{direct / cold:.2f}x faster", "", ""),
        Row("", "via warm mirror", f"{warm:.2f} s", f"{direct:.2f} s (direct)",
            f"{direct / warm:.1f}x faster", "≥ 5x faster", _verdict(direct / warm >= 5)),
    ]  # fmt: skip


def _growth(m: MemoryResult, phase: str) -> int:
    return m.cold_growth if phase == "cold" else m.warm_growth


def _memory_rows(title: str, results: dict[str, MemoryResult]) -> list[Row]:
    mine = results["cratemirror"]
    theirs = results.get("nginx")
    rows: list[Row] = []
    for phase in ("cold", "warm"):
        baseline = f"{_growth(theirs, phase) / MIB:.1f} MiB (nginx)" if theirs else "-"
        growth = _growth(mine, phase)
        rows.append(
            Row(title if not rows else "", f"peak RSS growth, {phase}", f"{growth / MIB:.1f} MiB",
                baseline, "", "≤ 64 MiB", _verdict(growth <= MEMORY_TARGET))
        )  # fmt: skip
    return rows


def rows(raw: Raw) -> list[Row]:
    out: list[Row] = []
    for key, runs in raw.warm.items():
        out += _warm_rows(key, raw.warm_titles[key], runs)
    if raw.cold:
        out += _cold_rows(raw.cold_title, raw.cold)
    if raw.cargo:
        out += _cargo_rows(raw.cargo_title, raw.cargo)
    if raw.memory:
        out += _memory_rows(raw.memory_title, raw.memory)
    return out


def table(all_rows: Sequence[Row]) -> str:
    header = ("workload", "metric", "cratemirror", "baseline", "ratio", "target", "met")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in all_rows:
        cells = (r.workload, r.metric, r.mirror, r.baseline, r.ratio, r.target, r.met)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def raw_section(raw: Raw) -> str:
    """Every round's numbers, so a median can be checked against its spread."""
    out: list[str] = []
    for key, runs in raw.warm.items():
        for server, results in runs.items():
            cells = ", ".join(
                f"{r.rps:,.0f} req/s {r.mb_per_s:,.0f} MB/s p50 {r.p50_ms:.2f} p99 {r.p99_ms:.2f} "
                f"cpu {r.cpu_us_per_request:.1f} us/req "
                f"(others {r.others:.0%})" + (f" errors {r.errors}" if r.errors else "")
                for r in results
            )
            out.append(f"- {key} / {server}: {cells}")
    for i, rnd in enumerate(raw.cold):
        cells = "; ".join(
            f"{kind} {side} ttfb {_ms(t.ttfb)} total {_ms(t.total)}"
            for kind, sides in rnd.items()
            for side, t in sides.items()
        )
        out.append(f"- cold round {i + 1}: {cells}")
    for variant, seconds in raw.cargo.items():
        out.append(f"- cargo fetch {variant}: " + ", ".join(f"{s:.2f} s" for s in seconds))
    for server, m in raw.memory.items():
        out.append(
            f"- memory {server}: {m.workers} workers, baseline {m.baseline / MIB:.1f} MiB, cold peak "
            f"{m.cold_peak / MIB:.1f} MiB ({m.cold_seconds:.1f} s), warm peak {m.warm_peak / MIB:.1f} MiB "
            f"({m.warm_seconds:.1f} s)"
        )
    return "\n".join(out)
