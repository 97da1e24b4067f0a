"""`python -m bench.fleet`: what the TLS + HTTP/2 front buys cargo.

A real `cargo fetch` of the bench's 100-crate tree on a fresh CARGO_HOME, the upstream 50 ms away
(`--latency-ms`), five ways:

- direct over HTTP/1.1: cargo straight at the fake upstream (plain http: at most 2 connections);
- direct over HTTP/2: the upstream behind its own TLS front (HAProxy, ALPN h2), its config.json `dl`
  pointing there too, as crates.io serves;
- the plain-http mirror, cold (fresh cache) and warm (cached, fresh CARGO_HOME);
- the same mirror behind deploy/haproxy/haproxy.cfg (TLS, h2), cold and warm.

Medians over `--rounds` (3). Needs cargo, haproxy and openssl; everything on 127.0.0.1, stopped at the
end; prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from bench.cargo import cargo_fetch
from bench.catalog import Params, build
from bench.driver import Upstream, mirror_config, new_mirror
from tests.fleet_support import HAProxy, make_tls

ROWS = (
    ("direct, HTTP/1.1", "direct-h1"),
    ("direct, HTTP/2 (TLS front on the upstream)", "direct-h2"),
    ("mirror, plain http, cold", "mirror-cold"),
    ("mirror, plain http, warm", "mirror-warm"),
    ("mirror behind the HTTP/2 front, cold", "front-cold"),
    ("mirror behind the HTTP/2 front, warm", "front-warm"),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def set_dl(upstream: Upstream, template: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{upstream.control}/dl", params={"template": template}) as response,
    ):
        response.raise_for_status()


async def one_round(upstream: Upstream, tmp: Path, n: int, results: dict[str, list[float]]) -> None:
    catalog = build(Params())
    deps, expect = catalog.root_deps(), len(catalog.tree) + 1
    base = tmp / f"round{n}"
    tls = make_tls(tmp / "tls")

    async def timed(key: str, run: Callable[[Path], Awaitable[float]]) -> None:
        results[key].append(await run(base / key))

    await timed("direct-h1", lambda d: cargo_fetch(upstream.index_url, d, deps, expect))

    host, port = upstream.host_port
    (base / "upstream-front").mkdir(parents=True)
    async with HAProxy(base / "upstream-front", tls, [(host, port)], bare=True) as front:
        await set_dl(upstream, f"{front.url}/crates")
        try:
            index = f"{front.url}/index/"
            await timed("direct-h2", lambda d: cargo_fetch(index, d, deps, expect, tls.ca_cert))
        finally:
            await set_dl(upstream, "{base}/crates")

    config = mirror_config(base, 3600)
    async with new_mirror(upstream, base, "mirror-plain", config) as mirror:
        index = f"{mirror.url}/index/"
        await timed("mirror-cold", lambda d: cargo_fetch(index, d, deps, expect))
        await timed("mirror-warm", lambda d: cargo_fetch(index, d, deps, expect))

    async with new_mirror(upstream, base, "mirror-front", config) as mirror:
        (base / "mirror-front-haproxy").mkdir()
        async with HAProxy(base / "mirror-front-haproxy", tls, [("127.0.0.1", mirror.port)]) as front:
            index = f"{front.url}/index/"
            await timed("front-cold", lambda d: cargo_fetch(index, d, deps, expect, tls.ca_cert))
            await timed("front-warm", lambda d: cargo_fetch(index, d, deps, expect, tls.ca_cert))
    log(f"  round {n + 1}: " + ", ".join(f"{key} {results[key][-1]:.2f} s" for _, key in ROWS))


async def run(rounds: int, latency: float, tmp: Path) -> dict[str, list[float]]:
    upstream = Upstream(tmp, Params())
    await upstream.start()
    results: dict[str, list[float]] = {key: [] for _, key in ROWS}
    try:
        await upstream.set_delay(latency)
        for n in range(rounds):
            await one_round(upstream, tmp, n, results)
    finally:
        await upstream.stop()
    return results


def table(results: dict[str, list[float]], latency: float) -> str:
    medians = {key: statistics.median(values) for key, values in results.items()}
    lines = [
        f"fleet: cargo fetch of the 100-crate tree, +{latency * 1e3:.0f} ms upstream, fresh CARGO_HOME "
        f"(median of {len(results['direct-h1'])})",
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
    args = parser.parse_args(argv)
    missing = [tool for tool in ("cargo", "haproxy", "openssl") if shutil.which(tool) is None]
    if missing:
        log(f"missing: {', '.join(missing)} (apt-get install -y haproxy openssl; cargo from rustup)")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="cratemirror-bench-fleet-"))
    try:
        results = asyncio.run(run(args.rounds, args.latency_ms / 1000, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(results, args.latency_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
