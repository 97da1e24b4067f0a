"""The real cargo through the mirror while the upstream misbehaves: stopped (a warm cache must be
enough, even though every index file is revalidated), and answering 503 to every other request (a cold
cache must still fill, the mirror absorbing the failures)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import MirrorFactory
from tests.fake_upstream import Dep, FakeRegistry, run_cargo, write_cargo_home, write_cargo_project
from tests.mirror_process import metric_value
from tests.system_tools import require_tool

Client = TestClient[Any, Any]
EXPECTED = {"top": "1.1.0", "mid": "0.2.0", "leaf": "0.3.1"}


def publish(registry: FakeRegistry) -> None:
    registry.add_crate("leaf", "0.3.0")
    registry.add_crate("leaf", "0.3.1")
    registry.add_crate("mid", "0.2.0", deps=[Dep("leaf", "^0.3")])
    registry.add_crate("top", "1.0.0")
    registry.add_crate("top", "1.1.0", deps=[Dep("mid", "^0.2")])


def require_cargo() -> None:
    require_tool("cargo", "rustup or Debian package cargo")


async def cargo(args: list[str], project: Path, home: Path) -> str:
    code, output = await run_cargo(args, project, home, timeout=120)
    assert code == 0, f"cargo {' '.join(args)} failed:\n{output}"
    return output


def assert_locked(project: Path, registry: FakeRegistry) -> None:
    lock = tomllib.loads((project / "Cargo.lock").read_text())
    packages = {p["name"]: p for p in lock["package"] if p["name"] != "app"}
    assert {name: p["version"] for name, p in packages.items()} == EXPECTED
    for name, version in EXPECTED.items():
        assert packages[name]["checksum"] == registry.get_version(name, version).cksum


def assert_fetched(project: Path, home: Path, registry: FakeRegistry) -> None:
    """The .crate files cargo keeps in CARGO_HOME are the upstream's bytes."""
    for name, version in EXPECTED.items():
        found = list((home / "registry" / "cache").glob(f"*/{name}-{version}.crate"))
        assert len(found) == 1, (name, found)
        assert found[0].read_bytes() == registry.get_version(name, version).data


async def mirror_metric(mirror: Client, name: str, **labels: str) -> float:
    response = await mirror.get("/metrics")
    return metric_value(await response.text(), name, **labels)


def new_project(tmp_path: Path) -> Path:
    project = tmp_path / "app"
    write_cargo_project(project, {"top": "1"})
    return project


def new_home(tmp_path: Path, name: str, mirror: Client) -> Path:
    home = tmp_path / name
    write_cargo_home(home, f"{str(mirror.make_url('')).rstrip('/')}/index/")
    return home


async def test_warm_cache_with_the_upstream_stopped(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    require_cargo()
    publish(registry)
    mirror = await mirror_factory(cache__index_ttl=0)  # every index request really revalidates
    project = new_project(tmp_path)
    warm_home = new_home(tmp_path, "home-warm", mirror)
    await cargo(["generate-lockfile"], project, warm_home)
    await cargo(["fetch"], project, warm_home)
    assert_locked(project, registry)

    await registry.stop()  # connection refused from now on
    (project / "Cargo.lock").unlink()
    fresh_home = new_home(tmp_path, "home-fresh", mirror)
    await cargo(["generate-lockfile"], project, fresh_home)
    await cargo(["fetch"], project, fresh_home)
    assert_locked(project, registry)
    assert_fetched(project, fresh_home, registry)

    # Each of the three index files was served stale, each tarball from the cache.
    assert await mirror_metric(mirror, "cratemirror_cache_requests_total", kind="index", result="stale") >= 3
    assert await mirror_metric(mirror, "cratemirror_cache_requests_total", kind="crate", result="hit") == 3
    assert await mirror_metric(mirror, "cratemirror_upstream_up") == 0


async def test_cold_cache_with_every_other_upstream_request_failing(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    require_cargo()
    publish(registry)
    mirror = await mirror_factory(upstream__retries=3)  # the shipped default
    registry.fail_every_other = 503
    project = new_project(tmp_path)
    home = new_home(tmp_path, "home", mirror)
    output = await cargo(["generate-lockfile"], project, home)
    output += await cargo(["fetch"], project, home)
    assert_locked(project, registry)
    assert_fetched(project, home, registry)

    noisy = [
        line
        for line in output.splitlines()
        if ("warning" in line.lower() or "error" in line.lower()) and "retry" not in line.lower()
    ]
    assert noisy == [], output
    failed = await mirror_metric(mirror, "cratemirror_upstream_requests_total", status="503")
    assert failed >= 1 + len(EXPECTED) * 2  # config.json, every index file and tarball failed once
    assert await mirror_metric(mirror, "cratemirror_cache_requests_total", result="error") == 0
