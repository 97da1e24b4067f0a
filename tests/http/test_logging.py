"""The access log: one line per request with body bytes, duration, X-Cache and upstream time, as text or
one JSON object per line; errors and checksum failures with enough context to act on."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from cratemirror.http.app import create_app
from cratemirror.logsetup import TEXT_FORMAT
from cratemirror.server.logs import ACCESS_LOGGER, AccessLogger
from tests.conftest import make_config
from tests.fake_upstream import FakeRegistry, index_path
from tests.mirror_process import MirrorProcess

ServerFactory = Callable[..., Awaitable[TestServer]]


def dl(name: str, version: str) -> str:
    return f"/api/v1/crates/{name}/{version}/download"


def idx(name: str) -> str:
    return f"/index/{index_path(name)}"


async def test_json_access_log_from_a_real_server(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.add_crate("alpha", "1.0.0")
    beta = registry.add_crate("beta", "1.0.0")
    gamma = registry.add_crate("gamma", "1.0.0")
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "mirror.yaml").write_text("logging:\n  format: json\n")
    requests = [
        ("GET", idx("alpha")),
        ("GET", idx("alpha")),
        ("GET", dl("beta", "1.0.0")),
        ("GET", dl("beta", "1.0.0")),  # a hit goes out through sendfile
        ("HEAD", dl("beta", "1.0.0")),
        ("GET", idx("nosuch")),
        ("GET", dl("gamma", "1.0.0")),  # corrupted upstream: a checksum failure
        ("GET", "/healthz"),
    ]
    answers = []
    async with MirrorProcess(registry.index_url, tmp_path / "cache", workdir, workers=1) as mirror:
        async with aiohttp.ClientSession() as session:
            for method, path in requests:
                registry.corrupt_crates = path == dl("gamma", "1.0.0")
                async with session.request(method, mirror.url + path) as response:
                    answers.append(
                        (response.status, response.headers.get("X-Cache", "-"), await response.read())
                    )
        assert await mirror.stop() == 0
    lines = [line for line in mirror.output().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(
        isinstance(record, dict) and {"time", "level", "pid", "message"} <= record.keys()
        for record in records
    )

    access = [record for record in records if record["logger"] == ACCESS_LOGGER]
    while access and access[0]["path"] == "/healthz":
        access.pop(0)  # the readiness probes of MirrorProcess.start()
    assert [(record["method"], record["path"]) for record in access] == requests
    for record, (status, x_cache, body) in zip(access, answers, strict=True):
        assert record["status"] == status
        assert record["cache"] == x_cache
        assert record["bytes"] == len(body), record  # body bytes, never header bytes
        assert record["duration_ms"] > 0
        assert record["remote"] == "127.0.0.1"
        assert record["user_agent"].startswith("Python/")
    assert [record["cache"] for record in access] == [
        "MISS",
        "HIT",
        "MISS",
        "HIT",
        "HIT",
        "MISS",
        "MISS",
        "-",
    ]
    assert [record["bytes"] for record in access[2:5]] == [len(beta.data), len(beta.data), 0]
    # Upstream time only for requests that went upstream themselves.
    went_upstream = [record["upstream_ms"] is not None for record in access]
    assert went_upstream == [True, False, True, False, False, True, True, False]
    assert all(record["upstream_ms"] > 0 for record in access if record["upstream_ms"] is not None)

    not_found = access[5]
    assert (not_found["status"], not_found["level"], not_found["error"]) == (404, "info", "crate not found")
    corrupt = access[6]
    assert corrupt["status"] == 502 and corrupt["level"] == "warning"
    assert "checksum mismatch for gamma 1.0.0" in corrupt["error"]
    # The error line says which crate, from where, what was expected and what came.
    [failure] = [record for record in records if record["level"] == "error"]
    assert failure["logger"] == "cratemirror.crates"
    for detail in ("gamma", "1.0.0", gamma.cksum, registry.url):
        assert detail in failure["message"]
    assert "nothing stored" in failure["message"]


async def test_text_access_line(
    registry: FakeRegistry, aiohttp_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry.add_crate("alpha", "1.0.0")
    app = create_app(make_config(registry.index_url, tmp_path / "cache"))
    server = await aiohttp_server(
        app, access_log_class=AccessLogger, access_log=logging.getLogger(ACCESS_LOGGER)
    )
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    headers = {"User-Agent": 'cargo 1.80 "quoted"'}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(server.make_url(idx("alpha"))) as response:
            body = await response.read()
        # A percent-encoded newline stays encoded: nobody can forge a second log line.
        raw = aiohttp.client.URL(str(server.make_url("/index/al/ph/al%0Aph")), encoded=True)
        async with session.get(raw) as response:
            assert response.status in (400, 404)
    lines = [_format(record) for record in caplog.records if record.name == ACCESS_LOGGER]
    assert len(lines) == 2
    assert all("\n" not in line for line in lines)
    miss = re.fullmatch(
        r'\S+ INFO cratemirror\.access\[\d+\]: 127\.0\.0\.1 "GET /index/al/ph/alpha" 200 (\d+) [\d.]+ms MISS '
        r'upstream=[\d.]+ms "cargo 1\.80 \\"quoted\\""',
        lines[0].split(" ", 1)[1],
    )
    assert miss is not None, lines[0]
    assert int(miss.group(1)) == len(body)
    assert '"GET /index/al/ph/al%0Aph" 404 14 ' in lines[1]
    assert lines[1].endswith(' error="404: Not Found"')


def _format(record: Any) -> str:
    return logging.Formatter(TEXT_FORMAT).format(record)
