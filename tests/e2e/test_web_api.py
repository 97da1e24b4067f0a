"""The crates.io web API is not proxied: every /api/v1 route but the download answers a crates.io-style
JSON error that the real cargo prints, saying what to run instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, run_cargo, write_cargo_project
from tests.system_tools import require_tool

NOT_PROXIED = "does not proxy the crates.io web API"


@pytest.mark.parametrize(
    ("method", "path", "instead"),
    [
        ("GET", "/api/v1/crates?q=serde&per_page=10", "cargo search --registry crates-io"),
        ("PUT", "/api/v1/crates/new", "cargo publish --registry crates-io"),
        ("DELETE", "/api/v1/crates/serde/1.0.0/yank", "cargo yank --registry crates-io"),
        ("PUT", "/api/v1/crates/serde/1.0.0/unyank", "cargo yank --registry crates-io"),
        ("GET", "/api/v1/crates/serde/owners", "cargo owner --registry crates-io"),
        ("PUT", "/api/v1/crates/serde/owners", "cargo owner --registry crates-io"),
        ("GET", "/api/v1/me", "cargo login --registry crates-io"),
        ("GET", "/api/v1/crates/serde", "--registry crates-io"),
        ("GET", "/api/v1/summary", "--registry crates-io"),
    ],
)
async def test_web_api_routes_answer_json_errors(
    mirror: TestClient[Any, Any], method: str, path: str, instead: str
) -> None:
    response = await mirror.request(method, path)
    assert response.status == 404
    assert response.headers["Content-Type"].startswith("application/json")
    document = await response.json()
    assert list(document) == ["errors"] and len(document["errors"]) == 1
    detail = document["errors"][0]["detail"]
    assert NOT_PROXIED in detail and instead in detail


async def test_download_route_with_another_method_is_405(mirror: TestClient[Any, Any]) -> None:
    response = await mirror.post("/api/v1/crates/serde/1.0.0/download")
    assert response.status == 405
    assert response.headers["Allow"] == "GET, HEAD"
    assert "downloads are GET or HEAD" in (await response.json())["errors"][0]["detail"]


async def test_cargo_search_through_the_mirror_prints_the_reason(
    registry: FakeRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    require_tool("cargo", "rustup or Debian package cargo")
    base = str(mirror.make_url("")).rstrip("/")
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'[registries.mirror]\nindex = "sparse+{base}/index/"\n')
    project = tmp_path / "app"
    write_cargo_project(project, {})
    code, output = await run_cargo(["search", "--registry", "mirror", "serde"], project, home)
    assert code != 0
    assert NOT_PROXIED in output and "cargo search --registry crates-io" in output, output
    (home / "credentials.toml").write_text('[registries.mirror]\ntoken = "any"\n')  # cargo asks for one
    code, output = await run_cargo(["owner", "--list", "serde", "--registry", "mirror"], project, home)
    assert code != 0
    assert NOT_PROXIED in output and "cargo owner --registry crates-io" in output, output
    assert registry.requests.total() == 0  # nothing of it reached upstream


async def test_cargo_search_through_the_mirror_with_an_api_url(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    require_tool("cargo", "rustup or Debian package cargo")
    registry.add_crate("serde", "1.0.0")
    registry.add_crate("serde", "1.0.219")
    registry.add_crate("serde_json", "1.0.140")
    mirror = await mirror_factory(upstream__api_url=registry.url)
    base = str(mirror.make_url("")).rstrip("/")
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'[registries.mirror]\nindex = "sparse+{base}/index/"\n')
    project = tmp_path / "app"
    write_cargo_project(project, {})
    for _ in range(2):  # the second one from the mirror's cache
        code, output = await run_cargo(["search", "--registry", "mirror", "serde"], project, home)
        assert code == 0, output
        assert 'serde = "1.0.219"' in output and 'serde_json = "1.0.140"' in output, output
    assert registry.count("/api/v1/crates") == 1
    assert registry.search_queries[0]["q"] == "serde"
