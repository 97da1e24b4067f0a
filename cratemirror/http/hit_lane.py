"""The hit lane: warm hits answered before aiohttp's router, from bytes made when the answer was.

A warm hit is a dictionary lookup; what it cost was the serving stack around it: the router trying the
app's routes, the application's handler chain, a `Response` with its headers copied, prepared (Date,
Server, Content-Length, Connection worked out per request) and serialised per request. The lane is the
server's request handler (under the connection guard): a keep-alive HTTP/1.1 `GET` of an index file
(crates.io's `/index/...`, an extra registry's `/registries/<name>/index/...`) or of a small crates.io
crate that finds a prepared answer (`index_answers.py`, `crate_answers.py`) is answered here with the
answer's status line and headers as bytes made once per answer, the `Date` line made once a second, and
the body, in one write. Everything else (a miss, an answer past its time or made before a policy
change, a conditional request, HEAD, gzip not yet made, HTTP/1.0, `Connection: close`, any other route)
goes on to the app exactly as before, and the app's path gives the same bytes for a hit.

What a hit must still do, it does here: the token check with `auth.required` (a refused token goes on
to the app, which answers and counts the 401), the refresh generation check, the metrics
(`cratemirror_request_duration_seconds`, `cratemirror_cache_requests_total`,
`cratemirror_bytes_served_total`), the audit record of a download, and the access line (aiohttp's
`finish_response` logs it as for any response).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import HttpVersion11

from cratemirror.cache.delivery import MetricResult
from cratemirror.cache.registry import Registry
from cratemirror.http.auth import TOKEN_NAME, presented_token
from cratemirror.http.context import MIRROR, TIMING, Mirror
from cratemirror.http.index_answers import Wire
from cratemirror.http.instrument import BYTES, KIND, RESULT
from cratemirror.names import DEFAULT_REGISTRY

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

INDEX_PREFIX = "/index/"
REGISTRIES_PREFIX = "/registries/"
CRATE_PREFIX = "/api/v1/crates/"  # with a prepared answer: .../<name>/<version>/download
_HIGH_WATER = 64 * 1024


class ReadyResponse(web.StreamResponse):
    """A response whose head (status line and headers but the Date line) and body are ready-made bytes:
    prepare() only takes the request's writer; write_eof() sends head, Date and body in one write."""

    def __init__(self, wire: Wire) -> None:
        super().__init__(status=200)
        self._headers = wire.headers  # shared by the answer's responses, read only (the access log)
        self._wire = wire
        self._keep_alive = True  # the lane takes only keep-alive HTTP/1.1 requests

    async def prepare(self, request: web.BaseRequest) -> None:
        if self._eof_sent or self._payload_writer is not None:
            return
        self._req = request
        self._payload_writer = request._payload_writer

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        request = self._req
        assert request is not None and self._payload_writer is not None
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        wire = self._wire
        transport.write(b"".join((wire.head, date_line(), b"\r\n", wire.body)))
        self._eof_sent = True
        self._body_length = len(wire.body)
        writer, self._payload_writer, self._req = self._payload_writer, None, None
        if transport.get_write_buffer_size() > _HIGH_WATER:
            await writer.drain()  # a big body the kernel did not take at once: wait as aiohttp would


_date_second = -1
_date_bytes = b""


def date_line() -> bytes:
    """`Date: ...\r\n`, made once a second (aiohttp's own Date value)."""
    global _date_second, _date_bytes
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_bytes = f"Date: {rfc822_formatted_time()}\r\n".encode("latin-1")
    return _date_bytes


class HitLane:
    """The server's request handler: warm hits here, everything else to `app_handler`."""

    def __init__(self, app: web.Application, app_handler: Handler) -> None:
        mirror: Mirror = app[MIRROR]
        self.mirror = mirror
        self.app_handler = app_handler
        self.registry = mirror.registries[DEFAULT_REGISTRY]
        self.extras = {registry.name: registry for registry in mirror.extras()}
        self.tokens = mirror.tokens if mirror.config.auth.required else None
        self.answered = 0  # hits this lane answered (the tests read it)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if (
            request.method == "GET"
            and request.version == HttpVersion11
            and request.keep_alive
            and not _conditional(request.headers)  # a 304 (or not): the app's path decides
        ):
            path = request.path
            response = None
            if path.startswith(INDEX_PREFIX):
                response = self.index_hit(request, self.registry, path[len(INDEX_PREFIX) :])
            elif path.startswith(CRATE_PREFIX):
                response = self.crate_hit(request, path)
            elif path.startswith(REGISTRIES_PREFIX):  # /registries/<name>/index/...
                name, _, rest = path[len(REGISTRIES_PREFIX) :].partition("/")
                registry = self.extras.get(name)
                if registry is not None and rest.startswith(INDEX_PREFIX[1:]):
                    response = self.index_hit(request, registry, rest[len(INDEX_PREFIX) - 1 :])
            if response is not None:
                return response
        return await self.app_handler(request)

    def index_hit(self, request: web.BaseRequest, registry: Registry, path: str) -> ReadyResponse | None:
        mirror = self.mirror
        registry.index.check_generation()  # a stat every few ms at most
        answer = mirror.index_answers.get(registry.name, path, mirror.policy.changes)
        if answer is None:
            return None
        gzip = answer.gzip_headers is not None and "gzip" in request.headers.get("Accept-Encoding", "")
        wire = answer.wire_for(gzip)
        if wire is None:
            return None
        if not self.admitted(request):
            return None
        self.count(request, registry, "index", wire)
        self.answered += 1
        return ReadyResponse(wire)

    def crate_hit(self, request: web.BaseRequest, path: str) -> ReadyResponse | None:
        answer = self.mirror.crate_answers.get(path, self.mirror.policy.changes)
        if answer is None or not self.admitted(request):
            return None
        wire = answer.wire
        self.count(request, self.registry, "crate", wire)
        self.answered += 1
        on_download = self.mirror.on_download
        if on_download is not None:  # the audit trail
            on_download(request, answer.asked, 200, wire.headers)
        return ReadyResponse(wire)

    def admitted(self, request: web.BaseRequest) -> bool:
        """With auth.required, a valid token (its name kept for the access log); otherwise the app's
        path answers the 401 and counts it."""
        if self.tokens is None:
            return True
        verdict = self.tokens.check(presented_token(request))  # type: ignore[arg-type]
        if verdict.reason is not None or verdict.name is None:
            return False
        request[TOKEN_NAME] = verdict.name
        return True

    def count(self, request: web.BaseRequest, registry: Registry, kind: str, wire: Wire) -> None:
        """What the counted routes' hook records for a hit: the metrics, and the access log's fields."""
        sent = len(wire.body)
        request[KIND] = kind
        request[RESULT] = MetricResult.HIT
        request[BYTES] = sent
        timing = request.get(TIMING)
        elapsed = time.perf_counter() - timing.started if timing is not None else 0.0
        registry.metrics.observe_request(kind, MetricResult.HIT, elapsed, sent)


def _conditional(headers: Mapping[str, str]) -> bool:
    return "If-None-Match" in headers or "If-Modified-Since" in headers


def install_hit_lane(app: web.Application, server: web.Server) -> HitLane:
    """Put the lane in front of the app's handler (before the connection guard wraps it, and before
    any connection opens: each takes the server's handler when it does)."""
    lane = HitLane(app, server.request_handler)
    server.request_handler = lane.handle
    return lane
