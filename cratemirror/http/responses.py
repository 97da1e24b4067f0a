"""Response helpers shared by the routes: one-line errors, conditional requests, sendfile."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import BinaryIO

from aiohttp import web

from cratemirror.http.sendfile import can_sendfile, corked, sendfile
from cratemirror.redact import redact

_CHUNK = 256 * 1024
ONE_WRITE_MAX = 256 * 1024


def error(
    status: int, reason: str, x_cache: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Error bodies are one plain-text line saying what was wrong (never a traceback)."""
    headers = {**(headers or {}), **({"X-Cache": x_cache} if x_cache else {})}
    one_line = redact(" ".join(reason.split()))
    return web.Response(status=status, text=one_line + "\n", headers=headers)


def not_modified(request: web.BaseRequest, etag: str, last_modified: str) -> bool:
    """True only when the client's validator matches ours (a 304 to a client without a copy breaks it)."""
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None:
        tags = [tag.strip() for tag in if_none_match.split(",")]
        return "*" in tags or etag in tags or f"W/{etag}" in tags
    if_modified_since = request.headers.get("If-Modified-Since")
    if if_modified_since and last_modified:
        try:
            return parsedate_to_datetime(if_modified_since) >= parsedate_to_datetime(last_modified)
        except (TypeError, ValueError):
            return False
    return False


async def send_file(
    request: web.BaseRequest,
    file: BinaryIO,
    size: int,
    headers: Mapping[str, str],
    keep: Callable[[bytes, Mapping[str, str]], None] | None = None,
) -> web.StreamResponse:
    """Send an open file; closes it. A small file goes out in one write with its headers (cheaper than
    any sendfile set-up), and is handed to `keep` (the hit lane's answers) if given; a large one through
    the kernel's sendfile where the event loop has it."""
    try:
        if size <= ONE_WRITE_MAX:
            body = os.pread(file.fileno(), size, 0)
            if keep is not None:
                keep(body, headers)
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.content_length = size
        try:
            if request.method == "HEAD" or not size:
                await response.prepare(request)
            else:
                with corked(request.transport):  # the headers leave with the file's first bytes
                    await response.prepare(request)
                    await _send_body(request, response, file, size)
            await response.write_eof()
        except ConnectionError:
            # Every write here goes to the client: it left mid-answer (a cancelled build, a session the
            # front cut). Routine: an access line, not aiohttp's ERROR traceback ("Cannot write to
            # closing transport"); the half-sent answer's connection is closed.
            if request.transport is not None:
                request.transport.abort()
        return response
    finally:
        file.close()


async def _send_body(
    request: web.BaseRequest, response: web.StreamResponse, file: BinaryIO, size: int
) -> None:
    """The file after the headers: the kernel's sendfile, else copied through the transport (TLS)."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    try:
        await asyncio.get_running_loop().sendfile(transport, file, 0, size)
    except NotImplementedError:  # an event loop without sendfile (uvloop): our own, else copy
        sent = can_sendfile(transport) and await sendfile(transport, file.fileno(), size)
        while not sent and (chunk := file.read(_CHUNK)):
            await response.write(chunk)
