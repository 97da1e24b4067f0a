"""The real cargo through the mirror: resolve, fetch and build cold; then again from the mirror's cache
alone with the upstream down and a fresh CARGO_HOME."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import MirrorFactory
from tests.fake_upstream import (
    SMALL_TREE_DEPS,
    SMALL_TREE_RESOLVED,
    FakeRegistry,
    publish_small_tree,
    run_cargo,
    write_cargo_home,
    write_cargo_project,
)
from tests.mirror_process import MirrorProcess
from tests.system_tools import require_tool

CRATES_IO_SOURCE = "registry+https://github.com/rust-lang/crates.io-index"
EXPECTED = SMALL_TREE_RESOLVED


async def cargo(args: list[str], project: Path, home: Path) -> None:
    code, output = await run_cargo(args, project, home)
    assert code == 0, f"cargo {' '.join(args)} failed:\n{output}"


def locked_packages(project: Path) -> dict[str, dict[str, Any]]:
    lock = tomllib.loads((project / "Cargo.lock").read_text())
    return {p["name"]: p for p in lock["package"] if p["name"] != "app"}


def assert_lockfile(project: Path, registry: FakeRegistry) -> None:
    packages = locked_packages(project)
    assert {name: p["version"] for name, p in packages.items()} == EXPECTED
    for name, version in EXPECTED.items():
        assert packages[name]["source"] == CRATES_IO_SOURCE
        assert packages[name]["checksum"] == registry.get_version(name, version).cksum, name


def tarball_fetches(registry: FakeRegistry, name: str, version: str) -> int:
    """Upstream requests for a version's tarball ('+' may be sent raw or as %2B)."""
    path = urlsplit(registry.download_url(registry.get_version(name, version))).path
    spellings = {path, path.replace("+", "%2B")}
    return sum(registry.requests[spelling] for spelling in spellings)


@pytest.mark.parametrize(
    "dl_template",
    [None, "{base}/files/{prefix}/{lowerprefix}/{crate}/{version}/{sha256-checksum}/{crate}-{version}.crate"],
    ids=["default-dl", "marker-dl"],
)
async def test_cargo_through_the_mirror(
    registry: FakeRegistry,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
    dl_template: str | None,
    record_property: Any,
) -> None:
    require_tool("cargo", "rustup or Debian package cargo")
    if dl_template is not None:
        registry.dl_template = dl_template
    publish_small_tree(registry)
    mirror: TestClient[Any, Any] = await mirror_factory()
    mirror_base = str(mirror.make_url("")).rstrip("/")
    project = tmp_path / "app"
    write_cargo_project(project, SMALL_TREE_DEPS)

    # Cold: everything comes through the mirror from the upstream.
    cold_home = tmp_path / "home-cold"
    write_cargo_home(cold_home, f"{mirror_base}/index/")
    started = time.monotonic()
    await cargo(["generate-lockfile"], project, cold_home)
    await cargo(["fetch"], project, cold_home)
    cold = time.monotonic() - started
    await cargo(["build", "--offline"], project, cold_home)
    assert (project / "target" / "debug" / "app").exists()
    assert_lockfile(project, registry)

    for name, version in EXPECTED.items():
        assert tarball_fetches(registry, name, version) == 1, (name, dict(registry.requests))
    assert registry.count("1.2.0") == 0  # the yanked version is never downloaded
    assert registry.count("1.0.0") == 0
    assert registry.count("nonexistent-dev") == 0
    for path in ("/index/1/a", "/index/1/b", "/index/1/z", "/index/3/o/opt", "/index/in/fl/inflect"):
        assert registry.count(path) == 1, (path, dict(registry.requests))
    assert registry.count("/index/config.json") == 1  # cargo's config.json is the mirror's own
    assert all(
        headers.get("User-Agent", "").startswith("cratemirror/") for _, _, headers in registry.request_log
    )
    assert registry.requests.total() == len(EXPECTED) + 5 + 1

    # Warm: the upstream is down, a fresh CARGO_HOME knows nothing; the mirror's cache is enough.
    registry.reset_counts()
    registry.down = True
    (project / "Cargo.lock").unlink()
    warm_home = tmp_path / "home-warm"
    write_cargo_home(warm_home, f"{mirror_base}/index/")
    started = time.monotonic()
    await cargo(["generate-lockfile"], project, warm_home)
    await cargo(["fetch"], project, warm_home)
    warm = time.monotonic() - started
    assert_lockfile(project, registry)
    assert registry.requests.total() == 0, dict(registry.requests)

    message = f"cargo e2e [{dl_template or 'default dl'}]: cold {cold:.2f}s, warm (upstream down) {warm:.2f}s"
    print(message)
    record_property("cargo_cold_seconds", round(cold, 3))
    record_property("cargo_warm_seconds", round(warm, 3))


async def test_cargo_through_the_served_process(registry: FakeRegistry, tmp_path: Path) -> None:
    """The same through `cratemirror serve --workers 2` (uvloop, SO_REUSEPORT, cross-process locks)."""
    require_tool("cargo", "rustup or Debian package cargo")
    publish_small_tree(registry)
    project = tmp_path / "app"
    write_cargo_project(project, SMALL_TREE_DEPS)
    async with MirrorProcess(registry.index_url, tmp_path / "cache", tmp_path, workers=2) as mirror:
        cold_home = tmp_path / "home-cold"
        write_cargo_home(cold_home, f"{mirror.url}/index/")
        await cargo(["generate-lockfile"], project, cold_home)
        await cargo(["fetch"], project, cold_home)
        assert_lockfile(project, registry)
        for name, version in EXPECTED.items():
            assert tarball_fetches(registry, name, version) == 1, (name, dict(registry.requests))
        assert registry.requests.total() == len(EXPECTED) + 5 + registry.count("/index/config.json")

        registry.reset_counts()
        registry.down = True
        (project / "Cargo.lock").unlink()
        warm_home = tmp_path / "home-warm"
        write_cargo_home(warm_home, f"{mirror.url}/index/")
        await cargo(["generate-lockfile"], project, warm_home)
        await cargo(["fetch"], project, warm_home)
        await cargo(["build", "--offline"], project, warm_home)
        assert_lockfile(project, registry)
        assert registry.requests.total() == 0, dict(registry.requests)
        assert await mirror.stop() == 0, mirror.output()
