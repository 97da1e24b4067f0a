"""`GET /api/v1/crates?q=…&per_page=…`: `cargo search` through the mirror (cratemirror.cache.search).

Registered before the catch-all of the web API (routes.web_api), which still answers every other
`/api/v1/...` request, and this one too when `upstream.api_url` is null. The auth middleware covers it
like the index (auth.required: a token).
"""

from __future__ import annotations

from aiohttp import web

from cratemirror.cache.search import BadQuery, SearchQuery, SearchService, SearchUnavailable
from cratemirror.config.schema import Config
from cratemirror.http import routes as http_routes
from cratemirror.http.instrument import BYTES, instrumented
from cratemirror.upstream.client import Upstream

SEARCH = web.AppKey("cratemirror.search", SearchService)

routes = web.RouteTableDef()


def setup(app: web.Application, config: Config, upstream: Upstream) -> None:
    """The service and the route; call before the other routes are added (the catch-all comes later)."""
    app[SEARCH] = SearchService(upstream, config.upstream.api_url, offline=config.offline)
    app.add_routes(routes)


@routes.get("/api/v1/crates")
@instrumented  # counted as kind=search, like the index and download routes
async def search(request: web.Request) -> web.StreamResponse:
    service = request.app[SEARCH]
    if not service.enabled:
        return await http_routes.web_api(request)
    http_routes.mark(request, "search", "error")
    try:
        query = SearchQuery.parse(request.query.get("q"), request.query.get("per_page"))
    except BadQuery as exc:
        return http_routes.api_error(400, f"search: {exc}")
    try:
        body, result = await service.search(query)
    except SearchUnavailable as exc:
        return http_routes.api_error(exc.status, str(exc))
    http_routes.mark(request, "search", result)
    request[BYTES] = len(body)
    headers = {"Content-Type": "application/json", "X-Cache": result.upper()}
    return web.Response(body=body, headers=headers)
