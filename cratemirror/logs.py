"""Logging setup (text or one JSON object per line) and the access log line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from cratemirror.config import LoggingConfig

ACCESS_LOGGER = "cratemirror.access"
# Our error bodies are one line; longer bodies are not error messages worth logging.
MAX_ERROR_TEXT = 500
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,  # several worker processes write to one stream
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            document.update(fields)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, separators=(",", ":"))


def setup_logging(config: LoggingConfig) -> None:
    # No record needs the caller's file and line, thread or process name: skipping them makes every
    # record (an access line per request) noticeably cheaper.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, body bytes, duration, X-Cache, upstream time; for an
    error answer also its one-line reason. 5xx answers are logged as warnings so they stand out."""

    def log(self, request: BaseRequest, response: StreamResponse, duration: float) -> None:
        fields = access_fields(request, response, duration)
        text = '{remote} "{method} {path}" {status} {bytes} {duration_ms:.1f}ms {cache}'.format(**fields)
        if fields["upstream_ms"] is not None:
            text += f" upstream={fields['upstream_ms']:.1f}ms"
        text += f" {json.dumps(fields['user_agent'])}"
        if "error" in fields:
            text += f" error={json.dumps(fields['error'])}"
        level = logging.WARNING if response.status >= 500 else logging.INFO
        self.logger.log(level, "%s", text, extra={"fields": fields})


def access_fields(request: BaseRequest, response: StreamResponse, duration: float) -> dict[str, Any]:
    # Imported here: the supervisor process imports this module for setup_logging alone, and must not
    # load prometheus_client before PROMETHEUS_MULTIPROC_DIR is set.
    from cratemirror.metrics import TIMING, RequestTiming
    from cratemirror.routes import BYTES

    timing = request.get(TIMING)
    upstream_ms = None
    if isinstance(timing, RequestTiming):
        duration = time.perf_counter() - timing.started  # the whole answer, sent
        if timing.upstream_requests:
            upstream_ms = round(timing.upstream_seconds * 1000, 3)
    fields: dict[str, Any] = {
        "remote": request.remote or "-",
        # As sent (still percent-encoded): no decoded newline or quote can forge a log line.
        "method": request.method,
        "path": request.raw_path,
        "status": response.status,
        "bytes": body_bytes(request, response, request.get(BYTES)),
        "duration_ms": round(duration * 1000, 3),
        "cache": response.headers.get("X-Cache", "-"),
        "upstream_ms": upstream_ms,
        "user_agent": request.headers.get("User-Agent", "-"),
    }
    reason = error_text(response)
    if reason is not None:
        fields["error"] = reason
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
