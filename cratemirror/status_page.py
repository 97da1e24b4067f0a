"""GET / : a small server-rendered page telling people how to point cargo here (no external assets)."""

from __future__ import annotations

import html

from aiohttp import web

from cratemirror.clientconfig import cargo_config_snippet
from cratemirror.context import MIRROR
from cratemirror.routes import base_url

routes = web.RouteTableDef()


@routes.get("/")
async def status(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    base = base_url(request)
    upstream = mirror.upstream
    up = "offline mode" if mirror.config.offline else ("up" if upstream.is_up else "down")
    last_error = html.escape(upstream.last_error or "none")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cratemirror</title>
<style>body{{font-family:system-ui,sans-serif;max-width:50rem;margin:2rem auto;padding:0 1rem}}
pre{{background:#f4f4f4;padding:1rem;overflow:auto}}</style></head>
<body><h1>cratemirror</h1>
<p>A caching mirror of <code>{html.escape(mirror.config.upstream.index_url)}</code>.
Put this in <code>~/.cargo/config.toml</code> (or a project's <code>.cargo/config.toml</code>):</p>
<pre id="snippet">{html.escape(cargo_config_snippet(base))}</pre>
<p>Upstream: <strong id="upstream">{up}</strong>; last error: <span id="last-error">{last_error}</span></p>
<p>Metrics: <a href="/metrics">/metrics</a></p>
</body></html>
"""
    return web.Response(text=page, content_type="text/html")
