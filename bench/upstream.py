"""The fake upstream registry in a process of its own (so the load generator, the servers under test
and the registry never share one event loop), plus a small control server to switch the added
latency and read request counts.

Run by the driver as ``python -m bench.upstream PARAMS_JSON``; prints one JSON line with its URLs, then
serves until SIGTERM/SIGINT or until its stdin closes (the driver died).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading

from aiohttp import web

from bench.catalog import DEP_REQ, Params, build, scale_name, scale_version
from tests.fake_upstream import Dep, FakeRegistry


def populate(registry: FakeRegistry, params: Params) -> int:
    count = 0
    for spec in build(params).all_crates():
        deps = [Dep(name, DEP_REQ) for name in spec.deps]
        for version in spec.versions:
            pad = spec.pad_to if version == spec.newest else 0
            registry.add_crate(spec.name, version, deps=deps, pad_to=pad)
            count += 1
    for i in range(params.scale_crates):
        for j in range(params.scale_versions):
            registry.add_crate(scale_name(i), scale_version(j))
            count += 1
    return count


def control_app(registry: FakeRegistry) -> web.Application:
    async def set_delay(request: web.Request) -> web.Response:
        registry.delay = float(request.query["seconds"])
        return web.json_response({"delay": registry.delay})

    async def stats(request: web.Request) -> web.Response:
        registry.request_log.clear()  # only the counters are wanted; keep memory flat
        return web.json_response({"requests": sum(registry.requests.values())})

    async def set_dl(request: web.Request) -> web.Response:
        # Where config.json sends downloads: "{base}/crates" (itself) or a TLS front's URL.
        registry.dl_template = request.query["template"]
        return web.json_response({"dl": registry.dl_url()})

    app = web.Application()
    app.router.add_post("/delay", set_delay)
    app.router.add_post("/dl", set_dl)
    app.router.add_get("/stats", stats)
    return app


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stop when the driver goes away, even if it was killed without cleaning up."""
    sys.stdin.buffer.read()
    loop.call_soon_threadsafe(stop.set)


async def serve(params: Params) -> None:
    registry = FakeRegistry()
    versions = populate(registry, params)
    await registry.start("127.0.0.1", 0)
    runner = web.AppRunner(control_app(registry), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        threading.Thread(target=_watch_stdin, args=(loop, stop), daemon=True).start()
        ready = {"url": registry.url, "index_url": registry.index_url, "control": f"http://{host}:{port}"}
        print(json.dumps({**ready, "versions": versions}), flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        await registry.stop()


def main() -> None:
    params = Params(**json.loads(sys.argv[1]))
    asyncio.run(serve(params))


if __name__ == "__main__":
    main()
