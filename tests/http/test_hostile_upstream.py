"""Issue 9: an upstream is untrusted input. Each test drives a real mirror process against a hostile
upstream (tests/hostile_upstream.py) and checks that nothing is written or deleted outside the cache,
no crate is poisoned, every resource is bounded, and the mirror keeps serving other clients."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.fake_upstream import make_crate_tarball
from tests.hostile_upstream import HostileUpstream, index_line, sha256
from tests.mirror_process import MirrorProcess, metric_value

GOOD = make_crate_tarball("good", "1.0.0")


@pytest.fixture
async def hostile() -> AsyncIterator[HostileUpstream]:
    async with HostileUpstream() as upstream:
        upstream.serve_bytes("/index/go/od/good", index_line("good", "1.0.0", sha256(GOOD)) + b"\n")
        upstream.serve_bytes("/dl/good/1.0.0/download", GOOD)
        yield upstream


async def get(mirror: MirrorProcess, path: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(mirror.url + path) as response:
        return response.status, await response.read()


async def still_serves(mirror: MirrorProcess) -> None:
    status, body = await get(mirror, "/api/v1/crates/good/1.0.0/download")
    assert (status, sha256(body)) == (200, sha256(GOOD))


def files_under(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def mirror_at(upstream_url: str, tmp_path: Path, config: str = "") -> MirrorProcess:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    (workdir / "mirror.yaml").write_text(config)
    return MirrorProcess(upstream_url, tmp_path / "cache", workdir, workers=1)


async def test_index_line_names_cannot_write_or_delete_outside_the_cache(
    hostile: HostileUpstream, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    operator_file = outside / "victim-2.0.0.crate"
    operator_file.write_bytes(b"the operator's own file")
    payload = b"attacker bytes"
    lines = [
        index_line(str(outside / "pwn"), "1.0.0", sha256(payload)),  # absolute path as a name
        index_line(str(outside / "victim"), "2.0.0", "0" * 64),  # a wrong cksum once deleted its file
        index_line("../../outside/rel", "3.0.0", sha256(payload)),
    ]
    hostile.serve_bytes("/index/3/f/foo", b"\n".join(lines) + b"\n")
    for name in (str(outside / "pwn"), str(outside / "victim"), "../../outside/rel", "foo"):
        for version in ("1.0.0", "2.0.0", "3.0.0"):
            hostile.serve_bytes(f"/dl/{name}/{version}/download", payload)
    before = files_under(outside)

    async with mirror_at(hostile.index_url, tmp_path) as mirror:
        for version in ("1.0.0", "2.0.0", "3.0.0"):
            status, body = await get(mirror, f"/api/v1/crates/foo/{version}/download")
            assert status == 502, (version, body)
            assert b"names another crate" in body and body[-1:] == b"\n"
        await still_serves(mirror)

    assert files_under(outside) == before
    assert not any(name.startswith("/dl/") and "good" not in name for name in hostile.requests)


async def test_a_line_for_another_crate_cannot_poison_it(hostile: HostileUpstream, tmp_path: Path) -> None:
    real = make_crate_tarball("victim", "1.0.0")
    payload = make_crate_tarball("victim", "1.0.0", lib_rs="// evil")
    hostile.serve_bytes("/index/3/f/foo", index_line("victim", "1.0.0", sha256(payload)) + b"\n")
    hostile.serve_bytes("/index/vi/ct/victim", index_line("victim", "1.0.0", sha256(real)) + b"\n")
    hostile.serve_bytes("/dl/victim/1.0.0/download", payload)

    async with mirror_at(hostile.index_url, tmp_path) as mirror:
        status, _ = await get(mirror, "/api/v1/crates/foo/1.0.0/download")
        assert status == 502
        for _ in range(2):  # nothing was stored under victim's name: each try verifies again
            status, body = await get(mirror, "/api/v1/crates/victim/1.0.0/download")
            assert status == 502 and b"checksum mismatch" in body, body
        assert hostile.count("/dl/victim/1.0.0/download") == 2
        await still_serves(mirror)


@pytest.mark.parametrize(
    "line",
    [
        b'{"name":"foo","vers":"1.0.0","deps":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"name":"foo","vers":"1.0.0","cksum":"' + b"A" * 64 + b'"}',
        b'{"name":"foo","vers":"1.0.0","cksum":"' + b"a" * 63 + b'"}',
        b'{"name":"foo","vers":"1.0.0","cksum":' + b'"' + b"a" * 64 + b'"',  # cut short: not JSON
    ],
    ids=["deeply-nested", "uppercase-cksum", "short-cksum", "not-json"],
)
async def test_an_unusable_line_is_a_502_never_a_500(
    hostile: HostileUpstream, tmp_path: Path, line: bytes
) -> None:
    hostile.serve_bytes("/index/3/f/foo", line + b"\n")
    async with mirror_at(hostile.index_url, tmp_path) as mirror:
        status, body = await get(mirror, "/api/v1/crates/foo/1.0.0/download")
        assert status == 502, body
        assert len(body.splitlines()) == 1
        assert "Traceback" not in mirror.output()
        await still_serves(mirror)


async def test_bodies_over_the_caps_are_refused_and_not_stored(
    hostile: HostileUpstream, tmp_path: Path
) -> None:
    hostile.serve_endless("/index/bi/gi/bigindex")
    big = os.urandom(3 * 1024 * 1024)
    hostile.serve_bytes("/index/bi/gc/bigcrate", index_line("bigcrate", "1.0.0", sha256(big)) + b"\n")
    hostile.serve_bytes("/dl/bigcrate/1.0.0/download", big)  # declared Content-Length over the cap
    hostile.serve_bytes("/index/en/dl/endless", index_line("endless", "1.0.0", "0" * 64) + b"\n")
    hostile.serve_endless("/dl/endless/1.0.0/download")
    config = "upstream:\n  max_index_size: 1MiB\n  max_crate_size: 2MiB\n  retries: 0\n"

    async with mirror_at(hostile.index_url, tmp_path, config) as mirror:
        for path in (
            "/index/bi/gi/bigindex",
            "/api/v1/crates/bigcrate/1.0.0/download",
            "/api/v1/crates/endless/1.0.0/download",
        ):
            status, body = await get(mirror, path)
            assert status == 502, (path, body)
            assert b"larger than" in body or b"is " in body
        status, _ = await get(mirror, "/index/bi/gi/bigindex")
        assert status == 502
        assert hostile.count("/index/bi/gi/bigindex") == 2  # refused, so not cached either
        await still_serves(mirror)
        async with aiohttp.ClientSession() as session, session.get(mirror.url + "/metrics") as response:
            metrics = await response.text()
        assert metric_value(metrics, "cratemirror_cache_requests_total", kind="crate", result="error") == 2
        assert metric_value(metrics, "cratemirror_cache_requests_total", kind="index", result="error") == 2

    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert not (tmp_path / "cache" / "crates" / "bigcrate").exists()
    assert not (tmp_path / "cache" / "crates" / "endless").exists()


async def test_index_redirects_stay_on_the_index_host(hostile: HostileUpstream, tmp_path: Path) -> None:
    async with mirror_at(hostile.index_url, tmp_path) as mirror:
        # To the mirror's own /metrics: another origin (another port) than the index.
        hostile.serve_bytes("/index/3/r/red", b"", status=302, headers={"Location": f"{mirror.url}/metrics"})
        hostile.serve_bytes("/index/3/m/mov", b"", status=301, headers={"Location": "/index/go/od/good"})
        hostile.serve_bytes("/index/3/f/fil", index_line("fil", "1.0.0", sha256(GOOD)) + b"\n")
        hostile.serve_bytes(
            "/dl/fil/1.0.0/download", b"", status=302, headers={"Location": "file:///etc/passwd"}
        )
        for _ in range(2):
            status, body = await get(mirror, "/index/3/r/red")
            assert status == 502 and b"another host" in body, body
        assert hostile.count("/index/3/r/red") == 2  # never cached
        status, body = await get(mirror, "/index/3/m/mov")  # same origin: followed
        assert status == 200 and b'"name":"good"' in body
        status, body = await get(mirror, "/api/v1/crates/fil/1.0.0/download")
        assert status == 502 and b"non-http(s)" in body, body
        await still_serves(mirror)


async def test_credentials_in_the_index_url_never_show(hostile: HostileUpstream, tmp_path: Path) -> None:
    seen_auth: dict[str, str | None] = {}

    async def failing(request: web.Request) -> web.StreamResponse:
        seen_auth[request.path] = request.headers.get("Authorization")
        return web.Response(status=500, text="boom")

    async def crate_elsewhere(request: web.Request) -> web.StreamResponse:
        seen_auth[request.path] = request.headers.get("Authorization")
        return web.Response(body=GOOD)

    hostile.serve("/index/3/b/bad", failing)
    # The tarball host differs from the index host (localhost vs 127.0.0.1): no credentials go there.
    port = hostile.url.rsplit(":", 1)[1]

    async def config_json(request: web.Request) -> web.StreamResponse:
        seen_auth[request.path] = request.headers.get("Authorization")
        return web.json_response({"dl": f"http://localhost:{port}/dl"})

    hostile.serve("/index/config.json", config_json)
    hostile.serve("/dl/good/1.0.0/download", crate_elsewhere)
    secret = "s3cretTOKEN"
    authed = hostile.index_url.replace("http://", f"http://robot:{secret}@")

    # One try: a 500 per retry would mark the upstream down and fail the next request fast.
    async with mirror_at(authed, tmp_path, "upstream:\n  retries: 0\n") as mirror:
        status, body = await get(mirror, "/index/3/b/bad")
        assert status == 502
        await still_serves(mirror)
        status, page = await get(mirror, "/")
        assert status == 200 and b"robot" not in page
        texts = [body, page, mirror.output().encode()]
    expected = "Basic " + base64.b64encode(f"robot:{secret}".encode()).decode()
    assert seen_auth["/index/3/b/bad"] == expected
    assert seen_auth["/index/config.json"] == expected
    assert seen_auth["/dl/good/1.0.0/download"] is None
    for text in texts:
        assert secret.encode() not in text
