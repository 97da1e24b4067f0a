"""`python -m bench.fleet`: what the TLS + HTTP/2 front buys cargo.

A real `cargo fetch` of the bench's 100-crate tree on a fresh CARGO_HOME, the upstream 50 ms away
(`--latency-ms`), these ways:

- direct over HTTP/1.1: cargo straight at the fake upstream (plain http: at most 2 connections);
- direct over HTTP/2: the upstream behind its own TLS front (HAProxy, ALPN h2), its config.json `dl`
  pointing there too, as crates.io serves;
- the plain-http mirror, cold (fresh cache) and warm (cached, fresh CARGO_HOME);
- the same mirror behind deploy/haproxy/haproxy.cfg (TLS, h2), cold and warm, and cold again with
  `upstream.prefetch: crates`;
- cargo's own floor: direct over HTTP/2 with the upstream answering at once.

Medians over `--rounds` (3). `--split-cpus` runs cargo on CPU 0 and the servers on the others (a client
and its servers are separate machines in real use; here the servers then share one CPU of two). Needs
cargo, haproxy and openssl (and taskset to split); everything on 127.0.0.1, stopped at the end; prints
one table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from bench.cargo import cargo_fetch
from bench.catalog import Params, build
from bench.driver import Upstream, mirror_config, new_mirror
from tests.fleet_support import HAProxy, make_tls

Results = dict[str, list[float]]

ROWS = (
    ("direct, HTTP/1.1", "direct-h1"),
    ("direct, HTTP/2 (TLS front on the upstream)", "direct-h2"),
    ("direct, HTTP/2, upstream at 0 ms (cargo's floor)", "direct-h2-0ms"),
    ("mirror, plain http, cold", "mirror-cold"),
    ("mirror, plain http, warm", "mirror-warm"),
    ("mirror behind the HTTP/2 front, cold", "front-cold"),
    ("mirror behind the HTTP/2 front, warm", "front-warm"),
    ("  the same, upstream.prefetch: crates, cold", "front-crates-cold"),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def set_dl(upstream: Upstream, template: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{upstream.control}/dl", params={"template": template}) as response,
    ):
        response.raise_for_status()


async def one_round(
    upstream: Upstream, tmp: Path, n: int, latency: float, cargo_prefix: Sequence[str], results: Results
) -> None:
    catalog = build(Params())
    deps, expect = catalog.root_deps(), len(catalog.tree) + 1
    base = tmp / f"round{n}"
    tls = make_tls(tmp / "tls")

    async def timed(key: str, index: str, https: bool = True) -> None:
        cainfo = tls.ca_cert if https else None
        results[key].append(await cargo_fetch(index, base / key, deps, expect, cainfo, cargo_prefix))

    async def behind_front(name: str, config: Path, keys: Sequence[str]) -> None:
        async with new_mirror(upstream, base, name, config) as mirror:
            (base / f"{name}-haproxy").mkdir()
            async with HAProxy(base / f"{name}-haproxy", tls, [("127.0.0.1", mirror.port)]) as front:
                for key in keys:
                    await timed(key, f"{front.url}/index/")

    await timed("direct-h1", upstream.index_url, https=False)

    host, port = upstream.host_port
    (base / "upstream-front").mkdir(parents=True)
    async with HAProxy(base / "upstream-front", tls, [(host, port)], bare=True) as front:
        await set_dl(upstream, f"{front.url}/crates")
        try:
            await timed("direct-h2", f"{front.url}/index/")
            # What cargo itself costs with an instant server: no mirror can make a build faster than this.
            await upstream.set_delay(0)
            await timed("direct-h2-0ms", f"{front.url}/index/")
        finally:
            await upstream.set_delay(latency)
            await set_dl(upstream, "{base}/crates")

    config = mirror_config(base, 3600)
    async with new_mirror(upstream, base, "mirror-plain", config) as mirror:
        await timed("mirror-cold", f"{mirror.url}/index/", https=False)
        await timed("mirror-warm", f"{mirror.url}/index/", https=False)
    await behind_front("mirror-front", config, ("front-cold", "front-warm"))
    crates_config = base / "mirror-crates.yaml"
    crates_config.write_text(config.read_text() + "upstream:\n  prefetch: crates\n")
    await behind_front("mirror-front-crates", crates_config, ("front-crates-cold",))
    log(f"  round {n + 1}: " + ", ".join(f"{key} {results[key][-1]:.2f} s" for _, key in ROWS))


async def run(rounds: int, latency: float, tmp: Path, cargo_prefix: Sequence[str]) -> Results:
    upstream = Upstream(tmp, Params())
    await upstream.start()
    results: Results = {key: [] for _, key in ROWS}
    try:
        await upstream.set_delay(latency)
        for n in range(rounds):
            await one_round(upstream, tmp, n, latency, cargo_prefix, results)
    finally:
        await upstream.stop()
    return results


def split_cpus() -> tuple[str, ...]:
    """cargo on CPU 0, this process and every server it starts on the others: in real use the client
    and the servers it talks to are separate machines, and one should not slow the other down here."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        log("fewer than 2 CPUs (or no taskset): cargo and the servers share them")
        return ()
    os.sched_setaffinity(0, set(cpus[1:]))
    return ("taskset", "-c", str(cpus[0]))


def table(results: Results, latency: float, split: bool) -> str:
    medians = {key: statistics.median(values) for key, values in results.items()}
    cpus = "cargo on one CPU, the servers on the rest" if split else "cargo and the servers share the CPUs"
    lines = [
        f"fleet: cargo fetch of the 100-crate tree, +{latency * 1e3:.0f} ms upstream, fresh CARGO_HOME "
        f"(median of {len(results['direct-h1'])}; "
        f"{cpus})",
        f"{'':46} {'seconds':>8} {'vs direct h1':>13} {'vs direct h2':>13}",
    ]
    for title, key in ROWS:
        m = medians[key]
        lines.append(
            f"{title:46} {m:8.2f} {m / medians['direct-h1']:12.2f}x {m / medians['direct-h2']:12.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument(
        "--split-cpus", action="store_true", help="cargo on CPU 0, the servers on the rest (default: shared)"
    )
    args = parser.parse_args(argv)
    missing = [tool for tool in ("cargo", "haproxy", "openssl") if shutil.which(tool) is None]
    if missing:
        log(f"missing: {', '.join(missing)} (apt-get install -y haproxy openssl; cargo from rustup)")
        return 2
    cargo_prefix = split_cpus() if args.split_cpus else ()
    tmp = Path(tempfile.mkdtemp(prefix="cratemirror-bench-fleet-"))
    try:
        results = asyncio.run(run(args.rounds, args.latency_ms / 1000, tmp, cargo_prefix))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(results, args.latency_ms / 1000, bool(cargo_prefix)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
