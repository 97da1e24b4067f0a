"""`cratemirror prune`: least-recently-used crates go first; --dry-run removes nothing."""

from __future__ import annotations

import time
from pathlib import Path

from cratemirror.fleet.storage.disk import Store
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry
from tests.tools_support import crate_file, run_cli, write_config


async def test_prune_keeps_the_most_recently_used(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    names = ["oldest", "older", "recent", "newest"]
    crates = {name: registry.add_crate(name, "1.0.0", pad_to=20_000) for name in names}
    cache = tmp_path / "cache"
    client = await mirror_factory(cache_dir=cache)
    for cv in crates.values():
        response = await client.get(f"/api/v1/crates/{cv.name}/{cv.vers}/download")
        assert response.status == 200
        await response.read()
    # Last use is kept in the cache's ledger: an hour apart, "oldest" the longest ago.
    now = time.time()
    store = Store(cache)
    try:
        for age, name in enumerate(reversed(names)):
            store.touch_crate(name, "1.0.0", now - 3600 * (age + 1))
    finally:
        store.close()
    sizes = {name: crate_file(cache, name, "1.0.0").stat().st_size for name in names}
    keep = sizes["recent"] + sizes["newest"]
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, cache)

    dry = await run_cli("prune", "--config", str(config), "--max-size", str(keep), "--dry-run", cwd=tmp_path)
    print(dry.output)
    assert dry.code == 0, dry.output
    assert (
        "prune: would remove oldest 1.0.0" in dry.stdout and "prune: would remove older 1.0.0" in dry.stdout
    )
    assert "recent" not in dry.stdout and "newest" not in dry.stdout
    assert "nothing was removed" in dry.stdout
    assert all(crate_file(cache, name, "1.0.0").exists() for name in names)

    real = await run_cli("prune", "--config", str(config), "--max-size", str(keep), cwd=tmp_path)
    print(real.output)
    assert real.code == 0, real.output
    assert real.stdout.splitlines()[-1].startswith("prune: removed 2 crates")
    assert [name for name in names if crate_file(cache, name, "1.0.0").exists()] == ["recent", "newest"]
    store = Store(cache)
    try:
        assert (
            store.get_crate_meta("oldest", "1.0.0") is None and store.get_crate_meta("older", "1.0.0") is None
        )
        assert store.get_crate_meta("newest", "1.0.0") is not None
        assert store.crate_bytes() == keep
    finally:
        store.close()

    within = await run_cli("prune", "--config", str(config), "--max-size", "1GiB", cwd=tmp_path)
    assert within.code == 0 and within.stdout.startswith("prune: nothing to remove"), within.output

    # The config's cache.max_size is the default.
    small = write_config(tmp_path / "small.yaml", registry.index_url, cache, max_size=str(sizes["newest"]))
    by_config = await run_cli("prune", "--config", str(small), cwd=tmp_path)
    assert by_config.code == 0, by_config.output
    assert "prune: removed recent 1.0.0" in by_config.stdout
    assert crate_file(cache, "newest", "1.0.0").exists()


async def test_prune_bad_max_size_is_a_one_line_usage_error(registry: FakeRegistry, tmp_path: Path) -> None:
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, tmp_path / "cache")
    result = await run_cli("prune", "--config", str(config), "--max-size", "lots", cwd=tmp_path)
    assert result.code == 2, result.output
    assert (
        result.stderr == "cratemirror: --max-size: cache.max_size: expected a size like 20GiB, got 'lots'\n"
    )
