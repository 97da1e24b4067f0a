"""Index freshness: stale-while-revalidate answers at once and revalidates once behind the answer;
a version published upstream is lockable by the real cargo within seconds after `cratemirror refresh`
(directly on the cache, or through a running mirror) and within index_ttl without it."""

from __future__ import annotations

import asyncio
import time
import tomllib
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from cratemirror.http.app import create_app
from cratemirror.http.context import MIRROR
from tests.conftest import MirrorFactory, make_config
from tests.fake_upstream import FakeRegistry, run_cargo, write_cargo_home, write_cargo_project
from tests.mirror_process import MirrorProcess, metric_value, wait_until
from tests.system_tools import require_tool
from tests.tools_support import run_cli, write_config

INDEX = "/index/se/rd/serde"


async def get(client: TestClient[Any, Any], path: str = INDEX) -> tuple[int, str, bytes]:
    async with client.session.get(client.make_url(path)) as response:
        return response.status, response.headers.get("X-Cache", ""), await response.read()


def locked_version(project: Path, name: str = "serde") -> str:
    lock = tomllib.loads((project / "Cargo.lock").read_text())
    return next(str(p["version"]) for p in lock["package"] if p["name"] == name)


async def cargo(args: list[str], project: Path, home: Path) -> str:
    code, output = await run_cargo(args, project, home)
    assert code == 0, f"cargo {' '.join(args)} failed:\n{output}"
    return output


async def test_stale_hits_answer_at_once_while_one_revalidation_waits_on_a_slow_upstream(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    registry.add_crate("serde", "1.0.0")
    mirror = await mirror_factory(cache__index_ttl=0, cache__stale_while_revalidate=300)
    assert (await get(mirror))[:2] == (200, "MISS")
    registry.add_crate("serde", "1.0.1")
    registry.index_gate = gate = asyncio.Event()  # upstream now takes as long as the test wants
    try:
        answers = await asyncio.wait_for(asyncio.gather(*(get(mirror) for _ in range(10))), timeout=10)
        assert {(status, x_cache) for status, x_cache, _ in answers} == {(200, "STALE")}
        assert all(b'"vers":"1.0.1"' not in body for _, _, body in answers)  # the cached copy, at once
        await asyncio.wait_for(registry.index_hold_started.wait(), timeout=10)
        assert registry.index_held == 1  # ten stale answers, one revalidation behind them
    finally:
        gate.set()

    async def revalidated() -> bool:
        _, _, body = await get(mirror)
        return b'"vers":"1.0.1"' in body

    await wait_until(revalidated, "the revalidated copy to be served")
    text = await (await mirror.get("/metrics")).text()
    assert metric_value(text, "cratemirror_cache_requests_total", kind="index", result="stale") >= 10
    assert metric_value(text, "cratemirror_cache_requests_total", kind="index", result="miss") == 1


async def test_one_background_revalidation_across_worker_processes(
    registry: FakeRegistry, aiohttp_client: Any, tmp_path: Path
) -> None:
    """Two apps on one cache dir stand for two workers: the second one's revalidation waits on the
    store lock the first holds, then finds the copy fresh and does not ask upstream."""
    registry.add_crate("serde", "1.0.0")
    config = make_config(
        registry.index_url, tmp_path / "cache", cache__index_ttl=2.0, cache__stale_while_revalidate=300
    )
    first = await aiohttp_client(create_app(config))
    second = await aiohttp_client(create_app(config))
    assert (await get(first))[:2] == (200, "MISS")
    registry.index_gate = gate = asyncio.Event()
    try:

        async def stale() -> bool:  # index_ttl (2s) passes
            return (await get(first))[1] == "STALE"

        await wait_until(stale, "the cached copy to pass index_ttl", timeout=10, interval=0.05)
        await asyncio.wait_for(registry.index_hold_started.wait(), timeout=10)
        assert (await asyncio.wait_for(get(second), timeout=5))[:2] == (200, "STALE")
    finally:
        gate.set()

    async def settled() -> bool:
        return not any(app.app[MIRROR].default.index._background for app in (first, second))

    await wait_until(settled, "both background revalidations to finish")
    assert registry.count(INDEX) == 2  # the first fetch and one revalidation
    status, x_cache, _ = await get(second)
    assert (status, x_cache) == (200, "HIT")


async def test_refresh_makes_a_new_version_lockable_at_once(registry: FakeRegistry, tmp_path: Path) -> None:
    """`cargo update --precise NEW` fails while the mirror's copy is fresh (index_ttl 30s); after
    `cratemirror refresh` it works at once, through every worker of a running `serve --workers 2`."""
    require_tool("cargo", "rustup or Debian package cargo")
    registry.add_crate("serde", "1.0.0")
    project = tmp_path / "app"
    write_cargo_project(project, {"serde": "1"})
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, tmp_path / "cache")
    async with MirrorProcess(registry.index_url, tmp_path / "cache", tmp_path, workers=2) as mirror:
        home = tmp_path / "home"
        write_cargo_home(home, f"{mirror.url}/index/")
        await cargo(["generate-lockfile"], project, home)
        assert locked_version(project) == "1.0.0"

        registry.add_crate("serde", "1.0.1")
        code, output = await run_cargo(["update", "-p", "serde", "--precise", "1.0.1"], project, home)
        assert code != 0, output  # the mirror's copy is still fresh (index_ttl 30s): 1.0.1 is not visible

        # Directly on the cache: every worker drops its in-memory copy.
        started = time.monotonic()
        result = await run_cli("refresh", "serde", "--config", str(config), cwd=tmp_path)
        assert result.code == 0, result.output
        assert result.stdout == "refresh: serde: revalidated\n"
        await cargo(["update", "-p", "serde", "--precise", "1.0.1"], project, home)
        direct = time.monotonic() - started
        assert locked_version(project) == "1.0.1"

        # Through the running mirror: a lockfile pinning a brand-new version builds.
        cv = registry.add_crate("serde", "1.0.2")
        started = time.monotonic()
        result = await run_cli("refresh", "serde", "--mirror", mirror.url, cwd=tmp_path)
        assert result.code == 0, result.output
        await cargo(["update"], project, home)
        assert locked_version(project) == "1.0.2"
        await cargo(["fetch", "--locked"], project, home)
        through_mirror = time.monotonic() - started
        assert registry.count(f"/crates/serde/{cv.vers}/download") == 1

        # A teammate, straight to upstream, locks a version newer than the mirror's fresh copy.
        registry.add_crate("serde", "1.0.3")
        teammate = tmp_path / "home-teammate"
        write_cargo_home(teammate, registry.index_url)
        await cargo(["update"], project, teammate)
        assert locked_version(project) == "1.0.3"
        code, output = await run_cargo(["fetch", "--locked"], project, home)
        assert code != 0, output
        result = await run_cli("refresh", "serde", "--mirror", mirror.url, cwd=tmp_path)
        assert result.code == 0, result.output
        await cargo(["fetch", "--locked"], project, home)
        assert await mirror.stop() == 0, mirror.output()
    print(f"refresh then cargo: direct {direct:.2f}s, through the mirror {through_mirror:.2f}s")
    assert direct < 10 and through_mirror < 10


async def test_refresh_refuses_bad_names_and_too_many(tmp_path: Path) -> None:
    result = await run_cli("refresh", "../etc", "--mirror", "http://127.0.0.1:9", cwd=tmp_path)
    assert (result.code, result.stdout) == (2, "")
    assert "cratemirror refresh: error: invalid crate name '../etc'" in result.stderr
    many = [f"c{n}" for n in range(1001)]
    result = await run_cli("refresh", *many, "--mirror", "http://127.0.0.1:9", cwd=tmp_path)
    assert result.code == 2 and "at most 1000 crate names" in result.stderr


async def test_refresh_route(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    registry.add_crate("serde", "1.0.0")
    mirror = await mirror_factory()
    assert (await get(mirror))[:2] == (200, "MISS")
    registry.add_crate("serde", "1.0.1")
    response = await mirror.post("/-/refresh/serde")
    assert response.status == 200
    assert (await response.json())["found"] is True
    status, x_cache, body = await get(mirror)
    assert (status, x_cache) == (200, "HIT") and b'"vers":"1.0.1"' in body
    assert (await mirror.post("/-/refresh/no-such-crate")).status == 200
    assert (await mirror.post("/-/refresh/..%2Fetc")).status == 400
    assert (await mirror.get("/-/refresh/serde")).status == 405
    assert registry.count(INDEX) == 2


async def test_new_version_lockable_within_index_ttl_without_refresh(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    """No refresh: once index_ttl has passed, one request revalidates behind its answer and the next
    cargo run sees the new version."""
    require_tool("cargo", "rustup or Debian package cargo")
    ttl = 2.0
    registry.add_crate("serde", "1.0.0")
    mirror = await mirror_factory(cache__index_ttl=ttl, cache__stale_while_revalidate=300)
    base = str(mirror.make_url("")).rstrip("/")
    project = tmp_path / "app"
    write_cargo_project(project, {"serde": "1"})
    home = tmp_path / "home"
    write_cargo_home(home, f"{base}/index/")
    await cargo(["generate-lockfile"], project, home)

    registry.add_crate("serde", "1.0.1")
    published = time.monotonic()

    async def visible() -> bool:
        return b'"vers":"1.0.1"' in (await get(mirror))[2]

    await wait_until(visible, "the new version to be served", timeout=ttl + 5, interval=0.1)
    waited = time.monotonic() - published
    assert waited < ttl + 1.0, waited
    await cargo(["update", "-p", "serde", "--precise", "1.0.1"], project, home)
    assert locked_version(project) == "1.0.1"
