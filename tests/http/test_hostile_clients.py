"""Issue 9 item 6: hostile request text. A bad Host header never reaches config.json or a shell line,
log lines cannot be forged or broken, a malformed request logs one line, and a client cannot make the
mirror look up thousands of made-up names upstream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from cratemirror.cache.ratelimit import BURST, PER_SECOND
from tests.fake_upstream import make_crate_tarball
from tests.hostile_upstream import HostileUpstream, index_line, sha256
from tests.mirror_process import MirrorProcess, raw_http, wait_until

GOOD = make_crate_tarball("good", "1.0.0")


@pytest.fixture
async def upstream() -> AsyncIterator[HostileUpstream]:
    async with HostileUpstream() as hostile:
        hostile.serve_bytes("/index/go/od/good", index_line("good", "1.0.0", sha256(GOOD)) + b"\n")
        yield hostile


async def start(upstream: HostileUpstream, tmp_path: Path, config: str = "") -> MirrorProcess:
    (tmp_path / "mirror.yaml").write_text(config)
    process = MirrorProcess(upstream.index_url, tmp_path / "cache", tmp_path, workers=1)
    await process.start()
    return process


@pytest.mark.parametrize("host", ["[::1'x]", 'a"$(touch pwned)', "evil`id`.example"])
async def test_a_bad_host_header_falls_back_to_the_listening_address(
    upstream: HostileUpstream, tmp_path: Path, host: str
) -> None:
    mirror = await start(upstream, tmp_path)
    try:
        request = f"GET /index/config.json HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        status, body = await raw_http("127.0.0.1", mirror.port, request.encode())
        assert status == 200, body
        assert json.loads(body)["dl"] == f"http://127.0.0.1:{mirror.port}/api/v1/crates"
        page = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        status, body = await raw_http("127.0.0.1", mirror.port, page.encode())
        assert status == 200 and b"$(" not in body and b"`id`" not in body
        async with (
            aiohttp.ClientSession() as session,
            session.get(mirror.url + "/index/config.json") as response,
        ):
            assert response.headers["Cache-Control"] == "no-store"
    finally:
        await mirror.stop()
    assert "Traceback" not in mirror.output()


async def test_text_access_lines_escape_quotes_and_a_malformed_request_logs_one_line(
    upstream: HostileUpstream, tmp_path: Path
) -> None:
    mirror = await start(upstream, tmp_path)
    try:
        await raw_http(
            "127.0.0.1", mirror.port, b'GET /index/a"b\\c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
        )
        await raw_http("127.0.0.1", mirror.port, b"GET /in dex HTTP/1.1 extra\r\nHost: x\r\n\r\n")
        await raw_http("127.0.0.1", mirror.port, b"GET /x HTTP/1.1\r\nHost: x\x00y\r\n\r\n")

        async def logged() -> bool:
            return mirror.output().count("bad request from") >= 2 and 'a\\"b\\\\c' in mirror.output()

        await wait_until(logged, "the access and bad-request lines")
    finally:
        await mirror.stop()
    output = mirror.output()
    assert "Traceback" not in output, output
    line = next(line for line in output.splitlines() if 'a\\"b' in line)
    assert '"GET /index/a\\"b\\\\c" 400' in line, line


async def test_json_log_lines_never_carry_lone_surrogates(upstream: HostileUpstream, tmp_path: Path) -> None:
    mirror = await start(upstream, tmp_path, "logging:\n  format: json\n")
    try:
        await raw_http(
            "127.0.0.1", mirror.port, b"GET /index/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        agent = (
            # (not /healthz: a health check's 200 is logged at debug level only)
            b"GET /nosuch HTTP/1.1\r\nHost: x\r\nUser-Agent: \xed\xa0\x80\xff\r\nConnection: close\r\n\r\n"
        )
        await raw_http("127.0.0.1", mirror.port, agent)
    finally:
        await mirror.stop()
    raw = await asyncio.to_thread(mirror.log_path.read_bytes)
    raw.decode("utf-8")  # strict: every byte written is valid UTF-8
    documents = [json.loads(line) for line in raw.decode().splitlines() if line.startswith("{")]
    agents = [document.get("user_agent", "") for document in documents]
    assert any("\\udcff" in agent for agent in agents), agents  # escaped as text, not a surrogate
    for document in documents:
        for value in document.values():
            if isinstance(value, str):
                value.encode("utf-8")  # no lone surrogate survives json.loads either


async def test_lookups_of_unknown_names_are_budgeted_per_client(
    upstream: HostileUpstream, tmp_path: Path
) -> None:
    mirror = await start(upstream, tmp_path)
    try:
        statuses: list[int] = []
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{mirror.url}/index/go/od/good") as response:
                assert response.status == 200
            started = time.monotonic()
            for number in range(BURST + 100):
                async with session.get(f"{mirror.url}/index/no/ne/none{number}") as response:
                    statuses.append(response.status)
                    if response.status == 429:
                        assert int(response.headers["Retry-After"]) >= 1
            async with session.get(f"{mirror.url}/index/go/od/good") as response:
                assert response.status == 200  # what the mirror holds is never refused
            async with session.get(f"{mirror.url}/index/no/ne/none0") as response:
                assert response.status == 404  # an answer it already holds costs nothing upstream
            elapsed = time.monotonic() - started
        lookups = sum(1 for path in upstream.requests if path.startswith("/index/no/ne/"))
        assert lookups <= BURST + PER_SECOND * elapsed + 1, (lookups, elapsed)  # tokens come back at a rate
        assert statuses.count(404) == lookups and statuses.count(429) == len(statuses) - lookups > 0
        # Another client has its own budget.
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        url = f"{mirror.url}/index/no/ne/none{BURST + 99}"
        async with aiohttp.ClientSession(connector=other) as session, session.get(url) as response:
            assert response.status == 404
    finally:
        await mirror.stop()
