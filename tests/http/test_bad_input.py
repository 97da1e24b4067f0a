"""Malformed names, versions and paths: 400 (or 404) with a one-line plain-text body, and never a request
upstream or a file outside the cache dir."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry
from tests.mirror_process import raw_http, raw_url

LONG = "a" * 1000

BAD_INDEX_PATHS = [
    "/index/1/1",  # digit first
    "/index/2/1a",
    "/index/2/_a",
    "/index/2/-a",
    f"/index/aa/aa/{'a' * 65}",  # longer than 64
    f"/index/aa/aa/{LONG}",  # an overlong segment
    f"/index/{LONG}/{LONG}/{LONG}",
    "/index/2/%C3%A9a",  # unicode
    "/index/in/fl/infl%C3%A9ctor",
    "/index/2/a%20",  # spaces
    "/index/3/a/a%20b",
    "/index/xx/yy/serde",  # wrong prefix
    "/index/SE/RD/serde",
    "/index/3/x/syn",
    "/index/se/serde",
    "/index/serde",
    "/index/se/rd/x/serde",
    "/index/se/rd/serde/",
    "/index//se/rd/serde",
    "/index/%2e%2e%2f%2e%2e%2fetc/passwd",  # percent-encoded ../
    "/index/se/rd/%2e%2e%2f%2e%2e%2fserde",
    "/index/%2e%2e/%2e%2e/etc/passwd",
    "/index/se/rd/%2e%2e",
    "/index/%2fetc%2fpasswd",
    "/index/../../etc/passwd",  # raw dot segments, sent as written
    "/index/se/rd/../../../etc/passwd",
    "/index/se/rd/serde%00",  # NUL
    "/index/2/a%00",
    "/index/se/rd/serde%0d%0a",  # CR/LF
    "/index/se/rd/serde%0d%0aX-Injected:%201",
    "/index/se/rd/serde%5c..%5c..",  # backslashes
]

BAD_DOWNLOAD_PATHS = [
    "/api/v1/crates/1serde/1.0.0/download",
    f"/api/v1/crates/{'a' * 65}/1.0.0/download",
    f"/api/v1/crates/{LONG}/1.0.0/download",
    "/api/v1/crates/s%C3%A9rde/1.0.0/download",
    "/api/v1/crates/ser%20de/1.0.0/download",
    "/api/v1/crates/%2e%2e%2f%2e%2e%2fetc/1.0.0/download",
    "/api/v1/crates/..%2f..%2fetc/1.0.0/download",
    "/api/v1/crates/serde/..%2f..%2f..%2fetc/download",
    "/api/v1/crates/serde/%2e%2e/download",
    "/api/v1/crates/serde%00/1.0.0/download",
    "/api/v1/crates/serde/1.0.0%00/download",
    "/api/v1/crates/serde%0d%0a/1.0.0/download",
    "/api/v1/crates/serde/1.0.0%0d%0a/download",
    "/api/v1/crates/serde/1.0/download",  # bad versions
    "/api/v1/crates/serde/01.0.0/download",
    "/api/v1/crates/serde/1.0.0+/download",
    "/api/v1/crates/serde/1.0.0-/download",
    "/api/v1/crates/serde/v1.0.0/download",
    f"/api/v1/crates/serde/1.0.0-{'a' * 145}/download",  # 151 characters
    f"/api/v1/crates/serde/{LONG}/download",
    "/api/v1/crates/serde/1.0.0%20/download",
    "/api/v1/crates/../../../etc/passwd/download",
    "/api/v1/crates/serde/1.0.0/../../../../etc/passwd",
]


@pytest.fixture
async def setup(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> AsyncIterator[tuple[TestClient[Any, Any], Path]]:
    """A mirror whose cache dir is nested, so an escape through ../ would land inside tmp_path where
    the test can see it. Yields the client and the cache dir; checks nothing reached upstream."""
    registry.add_crate("serde", "1.0.0")
    registry.add_crate("syn", "1.0.0")
    cache = tmp_path / "a" / "b" / "cache"
    mirror = await mirror_factory(cache_dir=cache)
    before = _tree_outside(tmp_path, cache)
    yield mirror, cache
    assert registry.requests.total() == 0, dict(registry.requests)
    assert _tree_outside(tmp_path, cache) == before
    assert list((cache / "crates").rglob("*")) == []
    assert list((cache / "tmp").iterdir()) == []


def _tree_outside(root: Path, cache: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if cache not in (p, *p.parents))


def _base(mirror: TestClient[Any, Any]) -> str:
    return str(mirror.make_url("")).rstrip("/")


def _port(mirror: TestClient[Any, Any]) -> int:
    port = mirror.port
    assert port is not None
    return port


def assert_one_line(text: str) -> None:
    assert text.endswith("\n") or "\n" not in text, repr(text)
    assert text.strip() and "\n" not in text.rstrip("\n"), repr(text)


@pytest.mark.parametrize("path", BAD_INDEX_PATHS + BAD_DOWNLOAD_PATHS)
async def test_bad_paths(setup: tuple[TestClient[Any, Any], Path], path: str) -> None:
    mirror, _ = setup
    for method in ("GET", "HEAD"):
        async with mirror.session.request(method, raw_url(_base(mirror), path)) as response:
            assert response.status in (400, 404), (method, path, response.status)
            if method == "GET" and response.headers["Content-Type"].startswith("application/json"):
                # Not the download route: the web API's crates.io-style error (what cargo shows).
                assert path.startswith("/api/v1/") and response.status == 404, path
                detail = (await response.json())["errors"][0]["detail"]
                assert "does not proxy the crates.io web API" in detail
            elif method == "GET":
                assert response.headers["Content-Type"].startswith("text/plain")
                assert_one_line(await response.text())


@pytest.mark.parametrize(
    "path",
    [
        "/index/1/1",
        "/index/xx/yy/serde",
        "/index/%2e%2e%2f%2e%2e%2fetc/passwd",
        "/index/../../etc/passwd",
        "/index/se/rd/serde%00",
        "/api/v1/crates/1serde/1.0.0/download",
        "/api/v1/crates/serde/1.0/download",
        "/api/v1/crates/serde/01.0.0/download",
        "/api/v1/crates/serde/1.0.0+/download",
        f"/api/v1/crates/serde/1.0.0-{'a' * 145}/download",
    ],
)
async def test_malformed_name_version_or_path_is_400(
    setup: tuple[TestClient[Any, Any], Path], path: str
) -> None:
    """Where the route matched, the contract's answer for a malformed name, version or path is 400."""
    mirror, _ = setup
    async with mirror.session.get(raw_url(_base(mirror), path)) as response:
        assert response.status == 400, path
        assert_one_line(await response.text())


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize(
    "path", ["/index/config.json", "/index/se/rd/serde", "/api/v1/crates/serde/1.0.0/download"]
)
async def test_other_methods_are_405(
    setup: tuple[TestClient[Any, Any], Path], method: str, path: str
) -> None:
    mirror, _ = setup
    async with mirror.session.request(method, raw_url(_base(mirror), path), data=b"x" * 100) as response:
        assert response.status == 405, (method, path)
        assert "GET" in response.headers.get("Allow", "")
        assert_one_line(await response.text())


RAW_REQUESTS = [
    b"GET /index/se/rd/ser\x00de HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # NUL in the line
    b"GET /index/se rd/serde HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # a space in the path
    b"GET /index/se/rd/ser\rde HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # a bare CR in the line
    b"GET index/se/rd/serde HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # no leading slash
    b"GET /api/v1/crates/serde/1.0.0/download\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # overlong line
    b"GET /index/../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", RAW_REQUESTS, ids=range(len(RAW_REQUESTS)))
async def test_malformed_request_lines(
    setup: tuple[TestClient[Any, Any], Path], request_bytes: bytes
) -> None:
    mirror, _ = setup
    status, _ = await raw_http(mirror.host, _port(mirror), request_bytes)
    assert status == 400
    healthy = await mirror.get("/healthz")  # and the server keeps serving
    assert healthy.status == 200
