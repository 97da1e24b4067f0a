"""A cache dir that turns read-only or fills up while the mirror runs: clients still get correct bytes
(from upstream, without storing), /readyz says why it is not ready, and nothing cached is damaged.

Tests run as root, and root ignores file permissions, so "read-only" is a real read-only bind mount
and "full" is a real tiny tmpfs (both need CAP_SYS_ADMIN, which this sandbox grants; the tests fail,
not skip, if mounting is refused).
"""

from __future__ import annotations

import errno
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from cratemirror.fleet.storage.disk import Store
from cratemirror.http.context import MIRROR
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path

Client = TestClient[Any, Any]


def crate_url(name: str, version: str) -> str:
    return f"/api/v1/crates/{name}/{version}/download"


class Mounts:
    """Mounts made by one test, undone (lazily, in reverse) when it ends."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def _mount(self, *args: str) -> None:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"mount {' '.join(args)}: {done.stderr.strip()}"

    def tmpfs(self, point: Path, size: str) -> None:
        point.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point))
        self.points.append(point)

    def read_only(self, point: Path) -> None:
        """Make `point` read-only for every open() from now on (files already open stay writable,
        as with a chmod)."""
        self._mount("--bind", str(point), str(point))
        self.points.append(point)
        self._mount("-o", "remount,bind,ro", str(point))

    def undo(self) -> None:
        for point in reversed(self.points):
            subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)
        self.points.clear()


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    # Requested before mirror_factory, so it is torn down after the mirror has closed its files.
    made = Mounts()
    try:
        yield made
    finally:
        made.undo()


def store_of(client: Client) -> Store:
    app: web.Application | None = client.app
    assert app is not None
    return app[MIRROR].default.store


def stored_crates(store: Store) -> set[str]:
    return {path.name for path in store.iter_crate_files()}


async def readyz(client: Client) -> tuple[int, str]:
    response = await client.get("/readyz")
    return response.status, await response.text()


def disk_errors_logged(caplog: pytest.LogCaptureFixture) -> int:
    return sum(
        1
        for record in caplog.records
        if record.name == "cratemirror.store" and record.levelno >= logging.ERROR
    )


@pytest.mark.parametrize("read_only", [("crates", "tmp"), ("",)], ids=["crates-and-tmp", "whole-dir"])
async def test_read_only_cache_dir(
    mounts: Mounts,
    registry: FakeRegistry,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    read_only: tuple[str, ...],
) -> None:
    cache_dir = tmp_path / "cache"
    kept = registry.add_crate("kept", "1.0.0")
    fresh = [registry.add_crate(f"fresh{n}", "1.0.0", pad_to=100_000) for n in range(2)]
    client = await mirror_factory(cache_dir=cache_dir, cache__index_ttl=0)
    store = store_of(client)
    assert (await client.get(crate_url("kept", "1.0.0"))).status == 200
    assert (await readyz(client))[0] == 200

    for part in read_only:  # e.g. a disk remounted read-only after I/O errors
        mounts.read_only(cache_dir / part)

    for cv in fresh:
        response = await client.get(crate_url(cv.name, "1.0.0"))
        assert response.status == 200, await response.text()
        assert await response.read() == cv.data
        assert registry.count(f"/crates/{cv.name}/") == 1
    index = await client.get(f"/index/{index_path('kept')}")  # revalidated (ttl 0), cannot be stored
    assert index.status == 200 and await index.read() == registry.index_file("kept")

    hit = await client.get(crate_url("kept", "1.0.0"))
    assert hit.status == 200 and hit.headers["X-Cache"] == "HIT"
    assert await hit.read() == kept.data
    assert stored_crates(store) == {"kept-1.0.0.crate"}
    assert list(store.tmp_dir.glob("*.part")) == []
    status, reason = await readyz(client)
    assert status == 503 and "not writable" in reason and reason.count("\n") == 1, reason
    assert disk_errors_logged(caplog) == 1  # at most once a minute, however many failed writes


async def test_full_cache_dir(
    mounts: Mounts,
    registry: FakeRegistry,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache_dir = tmp_path / "cache"
    # Room for the metadata database (SQLite and its WAL need a few hundred KiB), not for the crate.
    mounts.tmpfs(cache_dir, "1m")
    kept = registry.add_crate("kept", "1.0.0")
    big = registry.add_crate("big", "1.0.0", pad_to=2 * 1024 * 1024)  # more than the whole filesystem
    client = await mirror_factory(cache_dir=cache_dir)
    store = store_of(client)
    assert (await client.get(crate_url("kept", "1.0.0"))).status == 200

    response = await client.get(crate_url("big", "1.0.0"))
    assert response.status == 200, await response.text()
    assert await response.read() == big.data
    assert registry.count("/crates/big/") == 1

    hit = await client.get(crate_url("kept", "1.0.0"))
    assert hit.status == 200 and hit.headers["X-Cache"] == "HIT"
    assert await hit.read() == kept.data
    assert stored_crates(store) == {"kept-1.0.0.crate"}
    assert list(store.tmp_dir.glob("*.part")) == []
    status, reason = await readyz(client)
    assert status == 503 and "No space" in reason and reason.count("\n") == 1, reason
    assert disk_errors_logged(caplog) == 1


def fill_up(directory: Path) -> None:
    """Write a filler file until the filesystem has no space left."""
    with open(directory / "filler", "wb") as filler:
        block = b"\0" * 65536
        try:
            while True:
                filler.write(block)
                filler.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


async def test_restart_on_a_full_cache_dir(
    mounts: Mounts, registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    mounts.tmpfs(cache_dir, "1m")
    kept = registry.add_crate("kept", "1.0.0")
    fresh = registry.add_crate("fresh", "1.0.0")
    before = await mirror_factory(cache_dir=cache_dir)
    assert (await before.get(crate_url("kept", "1.0.0"))).status == 200
    await before.close()
    fill_up(cache_dir)

    # The disk filled up and the mirror was restarted (a deploy, a crash): it must still serve.
    client = await mirror_factory(cache_dir=cache_dir)
    hit = await client.get(crate_url("kept", "1.0.0"))
    assert hit.status == 200 and hit.headers["X-Cache"] == "HIT"
    assert await hit.read() == kept.data
    response = await client.get(crate_url("fresh", "1.0.0"))
    assert response.status == 200, await response.text()
    assert await response.read() == fresh.data
    status, reason = await readyz(client)
    assert status == 503 and ("No space" in reason or "disk is full" in reason), reason
