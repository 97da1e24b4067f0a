"""A client that leaves mid-answer is routine (a cancelled build, a front that moved the request to
another replica): the handler's write fails with "Cannot write to closing transport", which aiohttp
would log as an ERROR with a traceback. This middleware turns it into an access line with status 499
(nginx's "client closed request"); a ConnectionError while the client is still there is not touched."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger("cratemirror")

CLIENT_CLOSED = 499


@web.middleware
async def quiet_disconnects(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ConnectionError:
        transport = request.transport
        if transport is not None and not transport.is_closing():
            raise  # not the client's connection (e.g. one to upstream): a real error
        log.debug("client went away during %s %s", request.method, request.path)
        # Nothing can reach the client; aiohttp finds the connection closed and logs the access line.
        return web.Response(status=CLIENT_CLOSED)
