"""Logging setup for every process (server and tools): text or one JSON object per line, secrets redacted."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from cratemirror.redact import redact

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def clean_text(text: str) -> str:
    """Lone surrogates (aiohttp decodes undecodable request bytes with surrogateescape) become
    backslash escapes, so every line is valid UTF-8 and JSON parsers accept it."""
    if text.isascii():  # nearly every request: no copy made
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def quote_text(text: str) -> str:
    """For a quoted field of a text access line: a quote or backslash cannot end the field early."""
    if '"' in text or "\\" in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return clean_text(redact(super().format(record)))


class BadRequestFilter(logging.Filter):
    """aiohttp logs a malformed request (a broken request line, a NUL in a header) with its whole
    traceback: make it one line naming the client and the problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            first_line = (error.message or error.__class__.__name__).splitlines()[0]
            record.msg = "bad request from %s: %s"
            record.args = (record.args[0] if isinstance(record.args, tuple) and record.args else "-",
                           first_line[:200])  # fmt: skip
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,  # several worker processes write to one stream
            "message": clean_text(redact(record.getMessage())),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            document.update(fields)
        if record.exc_info:
            document["exception"] = clean_text(redact(self.formatException(record.exc_info)))
        return json.dumps(document, separators=(",", ":"))


def setup_records(level: str, json_format: bool) -> None:
    # No record needs the caller's file and line, thread or process name: skipping them makes every
    # record noticeably cheaper.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter(TEXT_FORMAT))
    logging.getLogger("aiohttp.server").addFilter(BadRequestFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
