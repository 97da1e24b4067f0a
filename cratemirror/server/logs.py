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
from collections.abc import Callable
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
        self._pid = os.getpid()  # each worker process makes its own sink (setup_logging)

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
                "pid": self._pid, "message": message, **fields,
            }  # fmt: skip
            return json.dumps(document, separators=(",", ":"))
        if int(now) != self._second:  # as TEXT_FORMAT writes a record; strftime once a second
            self._second = int(now)
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        return f"{self._second_text},{millis} {level} {logger}[{self._pid}]: {message}"

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
        sink = _access_sink
        if response.status < 400 and sink is not None and not sink.json_format:
            if self.logger.isEnabledFor(logging.INFO):
                line = plain_line(request, response, duration)
                sink.write(logging.INFO, self.logger.name, line, _NO_FIELDS)
            return
        level = logging.WARNING if response.status >= 500 else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        fields = access_fields(request, response, duration)
        text = (
            f'{fields["remote"]} "{quote_text(fields["method"])} {quote_text(fields["path"])}" '
            f"{fields['status']} {fields['bytes']} {fields['duration_ms']:.1f}ms {fields['cache']}"
        )
        if fields["upstream_ms"] is not None:
            text += f" upstream={fields['upstream_ms']:.1f}ms"
        text += f" {_quoted_agent(fields['user_agent'])}"
        if "token" in fields:  # the token's name, never the token
            text += f" token={fields['token']}"
        if "error" in fields:
            text += f" error={json.dumps(fields['error'])}"
        if sink is not None:
            sink.write(level, self.logger.name, text, fields)
        else:
            self.logger.log(level, "%s", text, extra={"fields": fields})


_NO_FIELDS: dict[str, Any] = {}


def plain_line(request: BaseRequest, response: StreamResponse, duration: float) -> str:
    """The text line of a successful answer (no error field), as AccessLogger.log writes it from
    access_fields, without making the fields: this runs for every hit."""
    timing_key, bytes_key, token_key, client_address = _keys()
    try:
        timing = request[timing_key]
    except KeyError:
        timing = None
    upstream = ""
    if timing is not None:
        duration = time.perf_counter() - timing.started  # the whole answer, sent
        if timing.upstream_requests:
            upstream = f" upstream={round(timing.upstream_seconds * 1000, 3):.1f}ms"
    try:
        counted = request[bytes_key]
    except KeyError:
        counted = None
    method = quote_text(clean_text(request.method))
    path = quote_text(clean_text(redact(request.raw_path)))
    agent = _quoted_agent(clean_text(request.headers.get("User-Agent", "-")))
    text = (
        f'{clean_text(client_address(request))} "{method} {path}" {response.status} '
        f"{body_bytes(request, response, counted)} {round(duration * 1000, 3):.1f}ms "
        f"{response.headers.get('X-Cache', '-')}{upstream} {agent}"
    )
    try:  # noqa: SIM105 (contextlib.suppress costs a context manager per request)
        text += f" token={request[token_key]}"  # the token's name, never the token
    except KeyError:
        pass
    return text


_QUOTED_AGENTS: dict[str, str] = {}  # a fleet's clients send a handful of User-Agents
_QUOTED_AGENTS_MAX = 256


def _quoted_agent(agent: str) -> str:
    quoted = _QUOTED_AGENTS.get(agent)
    if quoted is None:
        quoted = json.dumps(agent)
        if len(_QUOTED_AGENTS) >= _QUOTED_AGENTS_MAX:
            _QUOTED_AGENTS.clear()
        _QUOTED_AGENTS[agent] = quoted
    return quoted


_request_keys: tuple[Any, Any, Any, Callable[[BaseRequest], str]] | None = None


def _keys() -> tuple[Any, Any, Any, Callable[[BaseRequest], str]]:
    """The request keys the access line reads, imported on first use, not per line: the supervisor
    process imports this module for setup_logging alone, and must not load prometheus_client before
    PROMETHEUS_MULTIPROC_DIR is set."""
    global _request_keys
    if _request_keys is None:
        from cratemirror.http.auth import TOKEN_NAME
        from cratemirror.http.clients import client_address
        from cratemirror.http.context import TIMING
        from cratemirror.http.instrument import BYTES

        _request_keys = (TIMING, BYTES, TOKEN_NAME, client_address)
    return _request_keys


def access_fields(request: BaseRequest, response: StreamResponse, duration: float) -> dict[str, Any]:
    timing_key, bytes_key, token_key, client_address = _keys()
    timing = request.get(timing_key)
    upstream_ms = None
    if timing is not None:
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
        "bytes": body_bytes(request, response, request.get(bytes_key)),
        "duration_ms": round(duration * 1000, 3),
        "cache": response.headers.get("X-Cache", "-"),
        "upstream_ms": upstream_ms,
        "user_agent": clean_text(request.headers.get("User-Agent", "-")),
    }
    token_name = request.get(token_key)
    if token_name is not None:
        fields["token"] = token_name
    if response.status >= 400:
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
