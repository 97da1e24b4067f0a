"""A malicious upstream registry for security tests: a real aiohttp server on loopback that serves
whatever a test tells it to, per path: any bytes and headers, redirects, huge or endless bodies.

Unlike tests/fake_upstream.py (a well-behaved registry), nothing here is checked or made consistent:
the point is to send the mirror what a compromised or hostile registry could.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from tests.mirror_process import Service

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def index_line(name: str, vers: str, cksum: str, **extra: object) -> bytes:
    document = {"name": name, "vers": vers, "deps": [], "cksum": cksum, "features": {}, "yanked": False}
    document.update(extra)
    return json.dumps(document, separators=(",", ":")).encode()


class HostileUpstream(Service):
    """Routes are exact paths (`/index/3/f/foo`, `/dl/foo/1.0.0/download`); anything else is 404.
    config.json is served by default with `dl` pointing at `/dl` on this server."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    @property
    def index_url(self) -> str:
        return f"{self.url}/index/"

    def serve(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    def serve_bytes(
        self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(body=body, status=status, headers=headers)

        self.serve(path, handler)

    def serve_endless(self, path: str, chunk: bytes = b"x" * 65536) -> None:
        """A 200 with no Content-Length that never ends (until the client hangs up)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(1_000_000):  # bounded: 64 GB at most, far beyond any cap under test
                await response.write(chunk)
            return response

        self.serve(path, handler)

    def count(self, path: str) -> int:
        return sum(1 for seen in self.requests if seen == path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        handler = self.routes.get(request.path)
        if handler is not None:
            return await handler(request)
        if request.path == "/index/config.json":
            return web.json_response({"dl": f"{self.url}/dl"})
        return web.Response(status=404, text="not found")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
