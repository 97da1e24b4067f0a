"""Thin handlers: validate the request into value objects, call a service, shape the response."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

from aiohttp import web

from cratemirror.context import MIRROR
from cratemirror.crates import CachedCrate, Fill, NotFound
from cratemirror.index import GZIP_MIN, OfflineMiss
from cratemirror.names import InvalidRequest, parse_crate_version, parse_index_path
from cratemirror.responses import error, not_modified, send_file
from cratemirror.upstream import UpstreamError, UpstreamNotFound

# Keys on the request that the instrumentation middleware reads.
KIND = web.RequestKey("cratemirror.kind", str)
RESULT = web.RequestKey("cratemirror.result", str)
BYTES = web.RequestKey("cratemirror.bytes", int)

CRATE_HEADERS = {
    "Content-Type": "application/gzip",
    "Cache-Control": "public, max-age=31536000, immutable",
}
# Crates up to this size are verified before the first byte goes out, so a checksum mismatch is a clean
# 502; larger ones stream (cargo gives up on a silent connection) and a mismatch cuts the connection.
VERIFY_BEFORE_SENDING = 4 * 1024 * 1024

_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")

routes = web.RouteTableDef()


def _mark(request: web.Request, kind: str, result: str) -> None:
    request[KIND] = kind
    request[RESULT] = result


def base_url(request: web.Request) -> str:
    """`server.public_url`, else what the client used (honouring a reverse proxy's X-Forwarded-*)."""
    public = request.app[MIRROR].config.server.public_url
    if public:
        return public
    proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip().lower()
    if proto not in ("http", "https"):
        proto = request.scheme
    host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip() or request.host
    if not _HOST_RE.fullmatch(host):
        # Never the raw header (it reaches config.json and copyable shell lines): the address the
        # client connected to.
        host = _listening_address(request)
    return f"{proto}://{host}"


def _listening_address(request: web.Request) -> str:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        config = request.app[MIRROR].config.server
        sockname = (config.host, config.port)
    host, port = str(sockname[0]), int(sockname[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@routes.get("/index/config.json")
async def config_json(request: web.Request) -> web.Response:
    _mark(request, "config", "hit")
    base = base_url(request)
    body = json.dumps({"dl": f"{base}/api/v1/crates", "api": base}).encode()
    request[BYTES] = len(body)
    # no-store: its `dl` follows the request's host, so no shared cache may hand it to another client.
    headers = {"X-Cache": "HIT", "Cache-Control": "no-store"}
    return web.Response(body=body, content_type="application/json", headers=headers)


@routes.get("/index/{path:.+}")
async def index_file(request: web.Request) -> web.Response:
    _mark(request, "index", "error")
    mirror = request.app[MIRROR]
    try:
        crate = parse_index_path(request.match_info["path"])
    except InvalidRequest as exc:
        return error(400, str(exc))
    client = request.remote or "-"
    wait = mirror.unknown_names.retry_after(client)
    if wait is not None and not mirror.index.is_cached(crate):
        return error(
            429, f"too many lookups of crates that do not exist from {client}; retry in {wait}s",
            headers={"Retry-After": str(wait)},
        )  # fmt: skip
    try:
        result = await mirror.index.get(crate)
    except OfflineMiss as exc:
        return error(503, str(exc), "MISS")
    except UpstreamError as exc:
        return error(exc.status, f"upstream error for index file {crate.index_path}: {exc}", "MISS")
    request[RESULT] = result.result
    entry = result.entry
    if entry.status != 200:
        if result.result == "miss":  # this client's lookup went upstream for nothing
            mirror.unknown_names.charge(client)
        return error(404, "crate not found", result.x_cache)
    headers = {
        "Content-Type": "text/plain",
        "ETag": entry.etag,
        "Last-Modified": entry.last_modified,
        "Vary": "Accept-Encoding",
        "X-Cache": result.x_cache,
    }
    send_gzip = len(entry.body) >= GZIP_MIN and "gzip" in request.headers.get("Accept-Encoding", "")
    if send_gzip:
        headers["ETag"] = f"W/{entry.etag}"  # the same bytes once decoded, but another representation
    if not_modified(request, entry.etag, entry.last_modified):
        return web.Response(status=304, headers=headers)
    body = entry.body
    if send_gzip:
        body = await mirror.index.gzipped(entry)
        headers["Content-Encoding"] = "gzip"
    request[BYTES] = len(body)
    return web.Response(body=body, headers=headers)


@routes.get("/api/v1/crates/{name}/{version}/download")
async def download(request: web.Request) -> web.StreamResponse:
    _mark(request, "crate", "error")
    mirror = request.app[MIRROR]
    try:
        wanted = parse_crate_version(request.match_info["name"], request.match_info["version"])
    except InvalidRequest as exc:
        return error(400, str(exc))
    cached = mirror.crates.open_cached(wanted.crate.name, wanted.version)
    if cached is not None:
        request[RESULT] = "hit"
        return await _send_cached(request, cached)
    try:
        record = await mirror.crates.resolve(wanted)
    except NotFound as exc:
        request[RESULT] = "negative"  # answered "not found": the registry has no such crate or version
        return error(404, str(exc), "MISS")
    except OfflineMiss as exc:
        return error(503, str(exc), "MISS")
    except UpstreamError as exc:
        return error(exc.status, f"upstream error for the index of {wanted.crate.name}: {exc}", "MISS")
    cached = mirror.crates.open_cached(record.name, wanted.version)  # asked with another case?
    if cached is None:
        cached = await mirror.crates.adopt_unrecorded(record, wanted.version)
    if cached is not None:
        request[RESULT] = "hit"
        return await _send_cached(request, cached)
    if mirror.config.offline:
        return error(503, f"offline and {record.name} {wanted.version} is not cached", "MISS")
    headers = {**CRATE_HEADERS, "ETag": f'"{record.cksum}"', "X-Cache": "MISS"}
    if request.method == "HEAD":  # headers only: no reason to download the tarball now
        request[RESULT] = "miss"
        return web.Response(headers=headers)
    fill, joined = mirror.crates.fill(record, wanted.version)
    if joined:
        mirror.metrics.coalesced.labels("crate").inc()
    fill.hold()  # keeps the spool readable until this client is done, even after the fill ends
    try:
        return await _answer_from_fill(request, fill, record.name, wanted.version, headers)
    finally:
        fill.release()


async def _answer_from_fill(
    request: web.Request, fill: Fill, name: str, version: str, headers: dict[str, str]
) -> web.StreamResponse:
    try:
        # Shielded: these futures are shared, and a client that leaves must not cancel them for all.
        await asyncio.shield(fill.started)
        if fill.content_length is None or fill.content_length <= VERIFY_BEFORE_SENDING:
            await asyncio.shield(fill.finished)
    except UpstreamNotFound:
        return error(404, f"upstream has no tarball for {name} {version}", "MISS")
    except UpstreamError as exc:
        return error(exc.status, f"upstream error for {name} {version}: {exc}", "MISS")
    except Exception as exc:  # checksum mismatch, disk trouble: one line, never a traceback
        return error(502, str(exc), "MISS")
    request[RESULT] = "miss"
    if fill.stored_elsewhere:  # another worker process had just stored it
        cached = request.app[MIRROR].crates.open_cached(name, version)
        if cached is None:
            return error(502, f"{name} {version} vanished from the cache", "MISS")
        return await _send_cached(request, cached, x_cache="MISS")
    return await _stream_fill(request, fill, headers)


async def _send_cached(request: web.Request, cached: CachedCrate, x_cache: str = "HIT") -> web.StreamResponse:
    headers = {**CRATE_HEADERS, "ETag": f'"{cached.sha256}"', "X-Cache": x_cache}
    if not_modified(request, headers["ETag"], ""):
        cached.file.close()
        return web.Response(status=304, headers=headers)
    request[BYTES] = cached.size if request.method != "HEAD" else 0
    return await send_file(request, cached.file, cached.size, headers)


async def _stream_fill(request: web.Request, fill: Fill, headers: dict[str, str]) -> web.StreamResponse:
    """Send the fill's temp file as it grows; the final chunk is released only after verification."""
    response = web.StreamResponse(headers=headers)
    if fill.content_length is not None:
        response.content_length = fill.content_length
    sent = 0
    try:
        await response.prepare(request)
        while True:
            if sent < fill.published:
                chunk = fill.read_at(sent, 256 * 1024)
                await response.write(chunk)
                sent += len(chunk)
                continue
            if fill.finished.done():
                if fill.finished.exception() is not None:
                    _cut(request)  # the client must not see a complete body that failed verification
                    return response
                break
            await fill.wait_beyond(sent)
        await response.write_eof()
    except ConnectionError:
        pass  # the client left; the fill goes on and is stored for the next request
    finally:
        request[BYTES] = sent
    return response


def _cut(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.abort()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    problem = mirror.store.writable_problem() or mirror.disk_trouble.recent()
    if problem:
        return error(503, problem)
    return web.Response(text="ready\n")


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    await mirror.refresh_usage()
    body = mirror.metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
