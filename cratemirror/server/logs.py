"""The server's access log line and its batched sink (record formatting is in logsetup)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from cratemirror.config.schema import LoggingConfig
from cratemirror.logsetup import clean_text, quote_text, setup_records
from cratemirror.redact import redact

ACCESS_LOGGER = "cratemirror.access"
# Our error bodies are one line; longer bodies are not error messages worth logging.
MAX_ERROR_TEXT = 500


class AccessSink:
    """Writes access lines straight to a file descriptor, formatted exactly as the logging handlers
    would, without a LogRecord per request (that machinery cost a third of a warm hit's time).
    Lines are batched and written at least every FLUSH_SECONDS, in writes of at most PIPE_BUF bytes
    that end on a line boundary, so lines of several worker processes sharing one pipe never mix."""

    FLUSH_SECONDS = 0.1
    MAX_WRITE = 4096  # PIPE_BUF on Linux: a write this small to a pipe is atomic

    def __init__(self, fd: int, json_format: bool) -> None:
        self.fd = fd
        self.json_format = json_format
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""

    def write(self, level: int, logger: str, message: str, fields: dict[str, Any]) -> None:
        line = self._render(time.time(), logging.getLevelName(level), logger, message, fields)
        encoded = line.encode("utf-8", "replace") + b"\n"
        self._pending.append(encoded)
        self._pending_bytes += len(encoded)
        if self._pending_bytes >= self.MAX_WRITE or level >= logging.WARNING:
            self.flush()
        elif self._flush_handle is None:
            try:
                self._flush_handle = asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)
            except RuntimeError:  # no event loop: write at once
                self.flush()

    def _render(self, now: float, level: str, logger: str, message: str, fields: dict[str, Any]) -> str:
        millis = f"{int(now * 1000) % 1000:03d}"
        if self.json_format:  # as JsonFormatter writes a record
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            document = {
                "time": f"{stamp}.{millis}Z", "level": level.lower(), "logger": logger,
                "pid": os.getpid(), "message": message, **fields,
            }  # fmt: skip
            return json.dumps(document, separators=(",", ":"))
        if int(now) != self._second:  # as TEXT_FORMAT writes a record; strftime once a second
            self._second = int(now)
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        return f"{self._second_text},{millis} {level} {logger}[{os.getpid()}]: {message}"

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        chunk: list[bytes] = []
        size = 0
        for line in self._pending:
            if chunk and size + len(line) > self.MAX_WRITE:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write(b"".join(chunk))
        self._pending.clear()
        self._pending_bytes = 0

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        with contextlib.suppress(OSError):  # a closed stderr must not break serving
            while view:
                view = view[os.write(self.fd, view) :]


# Set by setup_logging in server processes; None (tests, libraries) means plain logging records.
_access_sink: AccessSink | None = None


def flush_access_log() -> None:
    if _access_sink is not None:
        _access_sink.flush()


def setup_logging(config: LoggingConfig) -> None:
    """The server's logging: the records' handler, and the access lines' own batched sink."""
    global _access_sink
    _access_sink = AccessSink(sys.stderr.fileno(), config.format == "json")
    atexit.register(flush_access_log)
    setup_records(config.level, config.format == "json")


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, body bytes, duration, X-Cache, upstream time; for an
    error answer also its one-line reason. 5xx answers are logged as warnings so they stand out."""

    def log(self, request: BaseRequest, response: StreamResponse, duration: float) -> None:
        if not self.logger.isEnabledFor(logging.WARNING if response.status >= 500 else logging.INFO):
            return
        fields = access_fields(request, response, duration)
        text = '{remote} "{method} {path}" {status} {bytes} {duration_ms:.1f}ms {cache}'.format(
            **fields | {"method": quote_text(fields["method"]), "path": quote_text(fields["path"])}
        )
        if fields["upstream_ms"] is not None:
            text += f" upstream={fields['upstream_ms']:.1f}ms"
        text += f" {json.dumps(fields['user_agent'])}"
        if "token" in fields:  # the token's name, never the token
            text += f" token={fields['token']}"
        if "error" in fields:
            text += f" error={json.dumps(fields['error'])}"
        level = logging.WARNING if response.status >= 500 else logging.INFO
        if _access_sink is not None:
            _access_sink.write(level, self.logger.name, text, fields)
        else:
            self.logger.log(level, "%s", text, extra={"fields": fields})


def access_fields(request: BaseRequest, response: StreamResponse, duration: float) -> dict[str, Any]:
    # Imported here: the supervisor process imports this module for setup_logging alone, and must not
    # load prometheus_client before PROMETHEUS_MULTIPROC_DIR is set.
    from cratemirror.http.auth import TOKEN_NAME
    from cratemirror.http.clients import client_address
    from cratemirror.http.context import TIMING
    from cratemirror.http.routes import BYTES
    from cratemirror.metrics import RequestTiming

    timing = request.get(TIMING)
    upstream_ms = None
    if isinstance(timing, RequestTiming):
        duration = time.perf_counter() - timing.started  # the whole answer, sent
        if timing.upstream_requests:
            upstream_ms = round(timing.upstream_seconds * 1000, 3)
    fields: dict[str, Any] = {
        "remote": clean_text(client_address(request)),
        # As sent (still percent-encoded): no decoded newline can forge a log line; a token in the
        # query string is masked.
        "method": clean_text(request.method),
        "path": clean_text(redact(request.raw_path)),
        "status": response.status,
        "bytes": body_bytes(request, response, request.get(BYTES)),
        "duration_ms": round(duration * 1000, 3),
        "cache": response.headers.get("X-Cache", "-"),
        "upstream_ms": upstream_ms,
        "user_agent": clean_text(request.headers.get("User-Agent", "-")),
    }
    token_name = request.get(TOKEN_NAME)
    if token_name is not None:
        fields["token"] = token_name
    reason = error_text(response)
    if reason is not None:
        fields["error"] = clean_text(redact(reason))
    return fields


def body_bytes(request: BaseRequest, response: StreamResponse, counted: object) -> int:
    """Body bytes sent: what the handler counted, else the response's body. Not `response.body_length`:
    that counts the header bytes too, and none of a body that went out through sendfile."""
    if request.method == "HEAD" or response.status in (204, 304):
        return 0
    if isinstance(counted, int):
        return counted
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        return len(response.body)
    return response.content_length or 0


def error_text(response: StreamResponse) -> str | None:
    if response.status < 400 or not isinstance(response, web.Response):
        return None
    body = response.body
    if not isinstance(body, bytes) or len(body) > MAX_ERROR_TEXT:
        return None
    return body.decode("utf-8", "replace").strip() or None
