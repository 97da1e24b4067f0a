"""Thin handlers: validate the request into value objects, call a service, shape the response."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Mapping

from aiohttp import web

from cratemirror.cache.delivery import (
    Blocked,
    CacheResult,
    Failed,
    FromFile,
    FromFill,
    GrowingBody,
    HeadersOnly,
    Redirect,
)
from cratemirror.cache.index import OfflineMiss
from cratemirror.cache.registry import Registry
from cratemirror.http.budget import charge
from cratemirror.http.clients import from_trusted_proxy
from cratemirror.http.context import MIRROR
from cratemirror.http.crate_answers import DownloadAsked
from cratemirror.http.index_answers import (
    Answer,
    IndexAnswers,
    fresh_until,
    headers_for,
    make_answer,
    wants_gzip,
)
from cratemirror.http.instrument import BYTES, KIND, REGISTRY, RESULT, instrumented
from cratemirror.http.policy import client_of, refusal
from cratemirror.http.responses import error, not_modified, send_file
from cratemirror.names import (
    DEFAULT_REGISTRY,
    CrateVersion,
    InvalidRequest,
    parse_crate_version,
    parse_index_path,
    parse_name,
)
from cratemirror.upstream.client import UpstreamError

REFRESH_INTERVAL = 1.0  # seconds: POST /-/refresh/<name> reaches upstream at most this often per name

_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")

routes = web.RouteTableDef()


def mark(request: web.Request, kind: str, result: str) -> None:
    """What the instrumentation middleware counts this request as (kind, cache result)."""
    request[KIND] = kind
    request[RESULT] = result


_mark = mark


def base_url(request: web.Request) -> str:
    """`server.public_url`, else what the client used (honouring a reverse proxy's X-Forwarded-*)."""
    public = request.app[MIRROR].config.server.public_url
    if public:
        return public
    # X-Forwarded-* only from server.trusted_proxies: anyone else could point cargo elsewhere.
    forwarded = request.headers if from_trusted_proxy(request) else {}
    proto = forwarded.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip().lower()
    if proto not in ("http", "https"):
        proto = request.scheme
    host = forwarded.get("X-Forwarded-Host", "").split(",")[0].strip() or request.host
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


def mirror_auth_required(request: web.Request) -> bool:
    return request.app[MIRROR].config.auth.required


def _registry(request: web.Request) -> Registry | None:
    """The registry bundle a request is for: crates-io on /index/ and /api/, else the extra registry
    named in the path (looked up among the configured names, never used to build a path)."""
    registries = request.app[MIRROR].registries
    name = request.match_info.get("registry")
    if name is None:
        return registries[DEFAULT_REGISTRY]
    registry = registries.get(name)
    if registry is None or registry.is_default:
        return None
    request[REGISTRY] = name
    return registry


def _no_registry() -> web.Response:
    return error(404, "no such registry on this mirror")


@routes.get("/index/config.json")
@routes.get("/registries/{registry}/index/config.json")
@instrumented
async def config_json(request: web.Request) -> web.Response:
    registry = _registry(request)
    if registry is None:
        return _no_registry()
    _mark(request, "config", "hit")
    base = base_url(request)
    document: dict[str, object] = {
        "dl": f"{base}{registry.download_path()}",
        "api": f"{base}{registry.mount}",
    }
    if mirror_auth_required(request):
        document["auth-required"] = True  # so cargo sends the token on every request (RFC 3139)
    body = json.dumps(document).encode()
    request[BYTES] = len(body)
    # no-store: its `dl` follows the request's host, so no shared cache may hand it to another client.
    headers = {"X-Cache": CacheResult.HIT, "Cache-Control": "no-store"}
    return web.Response(body=body, content_type="application/json", headers=headers)


@routes.get("/index/{path:.+}")
@routes.get("/registries/{registry}/index/{path:.+}")
@instrumented
async def index_file(request: web.Request) -> web.Response:
    registry = _registry(request)
    if registry is None:
        return _no_registry()
    _mark(request, "index", "error")
    mirror = request.app[MIRROR]
    answers = mirror.index_answers
    path = request.match_info["path"]
    registry.index.check_generation()  # a stat every few ms at most, not per request
    # Found: `path` is a validated crate's index path.
    answer = answers.get(registry.name, path, mirror.policy.changes)
    if answer is not None:
        request[RESULT] = "hit"
        return await _send_answer(request, registry, answers, path, answer, CacheResult.HIT)
    try:
        crate = parse_index_path(path)
    except InvalidRequest as exc:
        return error(400, str(exc))
    charged = await charge(request, registry.index, crate)  # nothing taken for a cached name
    if isinstance(charged, web.Response):
        return charged
    try:
        result = await registry.index.get(crate)
        await charged.settle(request, found=result.entry.status == 200)
    except OfflineMiss as exc:
        return error(503, str(exc), CacheResult.MISS)
    except UpstreamError as exc:
        return error(exc.status, f"upstream error for index file {crate.index_path}: {exc}", CacheResult.MISS)
    request[RESULT] = result.result
    entry = result.entry
    # The policy gates crates.io's crates (its advisories name crates.io's); off, it is not consulted.
    policy_on = registry.is_default and mirror.policy.enabled
    policy_changes = mirror.policy.changes  # read before the view: a change meanwhile makes it stale
    if policy_on:
        entry = await mirror.policy.view(crate.lower, entry)  # blocked versions yanked, with enforce
    if entry.status != 200:
        return error(404, "crate not found", result.x_cache)
    until = fresh_until(result.entry, registry.index, policy_on and mirror.policy.rules.enforcing)
    answer = make_answer(entry, until, policy_changes)
    # Kept for the next hits while fresh, unless the service took a newer entry meanwhile.
    if result.x_cache != CacheResult.STALE and registry.index.current(crate.lower) is result.entry:
        answers.put(registry.name, crate.index_path, answer)
    return await _send_answer(request, registry, answers, crate.index_path, answer, result.x_cache)


async def _send_answer(
    request: web.Request, registry: Registry, answers: IndexAnswers, path: str, answer: Answer, x_cache: str
) -> web.Response:
    gzip = wants_gzip(request, answer)
    headers = headers_for(answer, gzip, x_cache)
    shown = answer.shown
    if not_modified(request, shown.etag, shown.last_modified):
        return web.Response(status=304, headers=headers)
    body = shown.body
    if gzip:
        if answer.gzipped is None:
            answer.gzipped = await registry.index.gzipped(shown)
            answers.resized(registry.name, path, answer)
        body = answer.gzipped
    request[BYTES] = len(body)
    return web.Response(body=body, headers=headers)


@routes.get("/api/v1/crates/{name}/{version}/download")
@routes.get("/registries/{registry}/api/v1/crates/{name}/{version}/download")
@instrumented
async def download(request: web.Request) -> web.StreamResponse:
    registry = _registry(request)
    if registry is None:
        return _no_registry()
    _mark(request, "crate", "error")
    try:
        wanted = parse_crate_version(request.match_info["name"], request.match_info["version"])
    except InvalidRequest as exc:
        return error(400, str(exc))
    # A crate the store holds costs nothing; anything else may ask upstream for the name's index file.
    stored = registry.crates.holds(wanted.crate.name, wanted.version)
    charged = None if stored else await charge(request, registry.index, wanted.crate)
    if isinstance(charged, web.Response):
        return charged
    delivery = await registry.crates.deliver(wanted, head=request.method == "HEAD", client=client_of(request))
    if charged is not None:
        await charged.settle(request, found=not (isinstance(delivery, Failed) and delivery.status == 404))
    request[RESULT] = delivery.result
    match delivery:
        case FromFile(file=file, size=size, headers=headers):
            if not_modified(request, headers["ETag"], ""):
                file.close()
                return web.Response(status=304, headers=headers)
            request[BYTES] = size if request.method != "HEAD" else 0
            keep = None
            if request.method == "GET" and registry.is_default:  # a small one, for the hit lane's answers
                keep = _remembered(request, wanted)
            return await send_file(request, file, size, headers, keep)
        case FromFill(body=body, headers=headers, release=release):
            try:
                return await _stream_fill(request, body, headers)
            finally:
                release()
        case Redirect(location=location, headers=headers):
            return web.Response(status=302, headers={**headers, "Location": location})
        case HeadersOnly(headers=headers):
            return web.Response(headers=headers)
        case Blocked(rule=rule, reason=reason, x_cache=x_cache):
            return refusal(rule, reason, x_cache)
        case Failed(status=status, reason=reason, x_cache=x_cache):
            return error(status, reason, x_cache)


def _remembered(request: web.Request, wanted: CrateVersion) -> Callable[[bytes, Mapping[str, str]], None]:
    """Keeps a small stored crates.io crate the app's path sends, for the hit lane's next answers."""
    mirror = request.app[MIRROR]
    asked = DownloadAsked(DEFAULT_REGISTRY, wanted.crate.name, wanted.version)

    def keep(body: bytes, headers: Mapping[str, str]) -> None:
        mirror.crate_answers.remember(request.path, body, headers, mirror.policy, asked)

    return keep


async def _stream_fill(
    request: web.Request, fill: GrowingBody, headers: Mapping[str, str]
) -> web.StreamResponse:
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


# The web API (search, publish, yank, owners, login) is crates.io's, not the mirror's. cargo shows the
# `detail` of a crates.io-style JSON error, so the user learns what to run instead.
_API_HINTS = (
    (re.compile(r"crates/?"), "search", "cargo search --registry crates-io NAME"),
    (re.compile(r"crates/new/?"), "publish", "cargo publish --registry crates-io"),
    (re.compile(r"crates/[^/]+/[^/]+/(un)?yank/?"), "yank", "cargo yank --registry crates-io"),
    (re.compile(r"crates/[^/]+/owners/?"), "owners", "cargo owner --registry crates-io"),
    (re.compile(r"me/?"), "login", "cargo login --registry crates-io"),
)
_DOWNLOAD_RE = re.compile(r"crates/[^/]+/[^/]+/download")
GET_HEAD = {"Allow": "GET, HEAD"}


@routes.route("*", "/api/v1/{tail:.*}")
async def web_api(request: web.Request) -> web.Response:
    tail = request.match_info.get("tail", request.path.removeprefix("/api/v1/"))  # or from http.search
    if _DOWNLOAD_RE.fullmatch(tail):  # the one route served here, asked with another method
        return api_error(405, f"{request.method} is not allowed here: downloads are GET or HEAD", GET_HEAD)
    what, instead = "this", "the same cargo command with --registry crates-io"
    for pattern, operation, command in _API_HINTS:
        if pattern.fullmatch(tail):
            what, instead = operation, f"`{command}`"
            break
    return api_error(
        404,
        f"this is a crates.io mirror (cratemirror): it serves the index and crate downloads but does not "
        f"proxy the crates.io web API, so {what} does not work through it; use {instead} "
        f"(or https://crates.io/) instead",
    )


def api_error(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    body = json.dumps({"errors": [{"detail": detail}]})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


@routes.post("/-/refresh/{name}")
async def refresh(request: web.Request) -> web.Response:
    """Revalidate one index file now (`cratemirror refresh --mirror URL`); one name per request."""
    mirror = request.app[MIRROR]
    try:
        crate = parse_name(request.match_info["name"])
    except InvalidRequest as exc:
        return error(400, str(exc))
    if mirror.config.offline:
        return error(503, "offline: the mirror does not contact upstream")
    charged = await charge(request, mirror.default.index, crate, always=True)
    if isinstance(charged, web.Response):
        return charged
    try:
        # At most one upstream request per name per second, whoever asks.
        result = await mirror.default.index.refresh_once_per(
            crate, REFRESH_INTERVAL, lambda: mirror.unknown_names.claim_refresh(crate.lower, REFRESH_INTERVAL)
        )
        await charged.settle(request, found=result.entry.status == 200)
    except UpstreamError as exc:
        return error(exc.status, f"upstream error for index file {crate.index_path}: {exc}")
    body = {"name": crate.name, "found": result.entry.status == 200, "etag": result.entry.etag}
    return web.json_response(body)


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
    """From state kept up to date in the background (cache/readiness.py): never waits on a dependency."""
    mirror = request.app[MIRROR]
    tokens_problem = None
    if mirror.tokens is not None:  # still serving with the last good set: ready, but say so
        mirror.tokens.refresh()  # one stat a second at most
        tokens_problem = mirror.tokens.problem
    verdict = await mirror.readiness.verdict(tokens_problem)
    return web.Response(status=200 if verdict.ready else 503, text=verdict.text())


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    await mirror.refresh_usage()
    body = mirror.metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
