"""GET/HEAD /toolchains/dist/... and /toolchains/rustup/...: rustup's dist server through the mirror.

The route parses the path into a ToolchainPath, asks the ToolchainService, and turns its Delivery into
a response in one `match`; `Range: bytes=N-` (rustup resuming a component) gets a 206. These routes are
open even with auth.required: rustup sends no token (http/auth.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from typing import BinaryIO

from aiohttp import web

from cratemirror.cache.delivery import (
    Blocked,
    Delivery,
    Failed,
    FromFile,
    FromFill,
    HeadersOnly,
    Redirect,
)
from cratemirror.cache.toolchains.paths import UnknownToolchainPath, parse_toolchain_path
from cratemirror.cache.toolchains.service import ToolchainService, build_toolchains
from cratemirror.http import routes as routes_module
from cratemirror.http.context import MIRROR
from cratemirror.http.instrument import BYTES, KIND, RESULT, instrumented
from cratemirror.http.responses import error, not_modified
from cratemirror.names import DEFAULT_REGISTRY, InvalidRequest

TOOLCHAINS = web.AppKey("toolchains", ToolchainService)
CHUNK = 256 * 1024
_RANGE_RE = re.compile(r"bytes=(\d{1,19})-(\d{0,19})")

routes = web.RouteTableDef()


def install(app: web.Application) -> None:
    """Build the service, register the routes and its start-up and shutdown (a few lines in app.py)."""
    mirror = app[MIRROR]
    default = mirror.registries[DEFAULT_REGISTRY]  # its lock namespace and bucket prefix
    service = build_toolchains(
        mirror.config, mirror.metrics, default.coordination, mirror.disk_trouble, default.shared
    )
    app.add_routes(routes)
    if service is not None:
        app[TOOLCHAINS] = service
        app.cleanup_ctx.append(_lifecycle)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    service = app[TOOLCHAINS]
    await asyncio.to_thread(service.files.clean_temp_files)
    await service.record_usage()
    await service.start()
    if not app[MIRROR].config.offline:
        await service.upstream.start()
    yield
    await service.close()
    await service.upstream.close()


@routes.route("*", "/toolchains/{path:.*}")
@instrumented
async def toolchain_file(request: web.Request) -> web.StreamResponse:
    request[KIND] = "toolchain"
    request[RESULT] = "error"
    if request.method not in ("GET", "HEAD"):
        allow = {"Allow": "GET, HEAD"}
        return error(405, f"{request.method} is not allowed here: GET or HEAD", headers=allow)
    service = request.app.get(TOOLCHAINS)
    if service is None:
        return error(404, "toolchains are not served by this mirror (toolchains.upstream is null)")
    try:
        key = parse_toolchain_path(request.match_info["path"])
    except UnknownToolchainPath as exc:
        return error(404, str(exc))
    except InvalidRequest as exc:
        return error(400, str(exc))
    head = request.method == "HEAD"
    delivery: Delivery = await service.deliver(key, head=head, ranged=_range(request) is not None)
    request[RESULT] = delivery.result.value
    match delivery:
        case FromFile(file=file, size=size, headers=headers):
            return await _send_file(request, file, size, headers)
        case FromFill(body=body, headers=headers, release=release):
            try:
                # the download route's streaming: cut before the last byte if verification fails
                return await routes_module._stream_fill(request, body, {**headers, "Accept-Ranges": "bytes"})
            finally:
                release()
        case HeadersOnly(headers=headers):
            return web.Response(headers=headers)
        case Redirect(location=location, headers=headers):
            return web.Response(status=302, headers={**headers, "Location": location})
        case Blocked(reason=reason, x_cache=x_cache):
            return error(403, reason, x_cache.value)
        case Failed(status=status, reason=reason, x_cache=x_cache):
            return error(status, reason, x_cache.value)


def _range(request: web.Request) -> tuple[int, int | None] | None:
    """A single `bytes=N-[M]` range (what rustup sends to resume), else None (the whole file)."""
    match = _RANGE_RE.fullmatch(request.headers.get("Range", "").strip())
    if match is None:
        return None
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else None
    if end is not None and end < start:
        return None
    return start, end


async def _send_file(
    request: web.Request, file: BinaryIO, size: int, headers: Mapping[str, str]
) -> web.StreamResponse:
    try:
        etag = headers.get("ETag")
        if etag is not None and not_modified(request, etag, ""):
            return web.Response(status=304, headers=headers)
        start, end, status = 0, size - 1, 200
        wanted = _range(request)
        if_range = request.headers.get("If-Range")
        if wanted is not None and (if_range is None or if_range == etag):
            start = wanted[0]
            end = min(wanted[1] if wanted[1] is not None else size - 1, size - 1)
            if start >= size:
                return error(416, f"range starts at {start}, the file is {size} bytes",
                             headers={"Content-Range": f"bytes */{size}"})  # fmt: skip
            status = 206
        out_headers = {**headers, "Accept-Ranges": "bytes"}
        if status == 206:
            out_headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        count = max(end - start + 1, 0)
        response = web.StreamResponse(status=status, headers=out_headers)
        response.content_length = count
        await response.prepare(request)
        if request.method != "HEAD" and count:
            await _copy(request, response, file, start, count)
            request[BYTES] = count
        await response.write_eof()
        return response
    finally:
        file.close()


async def _copy(
    request: web.Request, response: web.StreamResponse, file: BinaryIO, start: int, count: int
) -> None:
    fileno = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        fileno = file.fileno()
    transport = request.transport
    if fileno is not None and transport is not None:
        try:
            await asyncio.get_running_loop().sendfile(transport, file, start, count)
            return
        except NotImplementedError:  # an event loop without sendfile (uvloop): copy in chunks
            pass
    file.seek(start)
    remaining = count
    while remaining > 0:
        chunk = file.read(min(CHUNK, remaining))
        if not chunk:
            break
        await response.write(chunk)
        remaining -= len(chunk)
