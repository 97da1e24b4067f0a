"""`cratemirror verify [--fix]`: a flipped byte, a missing file and an orphan, while the mirror runs."""

from __future__ import annotations

import shutil
from pathlib import Path

from cratemirror.fleet.storage.disk import Store
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry
from tests.tools_support import crate_file, run_cli, write_config

NO_MISSING = "0 missing (checksum recorded, no file)"


async def test_verify_finds_and_fixes_damage_while_the_mirror_runs(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    crates = {name: registry.add_crate(name, "1.0.0") for name in ("flipped", "gone", "fine", "Source")}
    cache = tmp_path / "cache"
    client = await mirror_factory(cache_dir=cache)
    for cv in crates.values():
        response = await client.get(f"/api/v1/crates/{cv.name}/{cv.vers}/download")
        assert response.status == 200 and await response.read() == cv.data
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, cache)

    clean = await run_cli("verify", "--config", str(config), cwd=tmp_path)
    assert clean.code == 0, clean.output
    assert (
        clean.stdout.splitlines()[-1]
        == f"verify: 4 crate files checked: 4 ok, 0 corrupt, 0 orphaned; {NO_MISSING}"
    )

    flipped = crate_file(cache, "flipped", "1.0.0")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    crate_file(cache, "gone", "1.0.0").unlink()
    orphan = crate_file(cache, "Source", "9.9.9")  # a file nobody recorded a checksum for
    shutil.copy(crate_file(cache, "Source", "1.0.0"), orphan)
    stray = cache / "crates" / "junk" / "notes.crate"  # not even named like a crate file
    stray.parent.mkdir()
    stray.write_bytes(b"not a crate")

    found = await run_cli("verify", "--config", str(config), cwd=tmp_path)
    print(found.output)
    assert found.code == 1, found.output
    assert (
        "verify: 5 crate files checked: 2 ok, 1 corrupt, 2 orphaned; 1 missing (checksum recorded, no file)"
        in found.stdout
    )
    assert "CORRUPT flipped 1.0.0: bytes hash to" in found.stderr
    assert f"expected {crates['flipped'].cksum}" in found.stderr
    assert "ORPHANED Source 9.9.9: no checksum recorded" in found.stderr
    assert "ORPHANED crates/junk/notes.crate" in found.stderr
    assert "MISSING gone 1.0.0: checksum recorded but no file" in found.stderr
    assert flipped.exists() and orphan.exists() and stray.exists()  # read-only without --fix

    fixed = await run_cli("verify", "--config", str(config), "--fix", cwd=tmp_path)
    assert fixed.code == 0, fixed.output
    assert "verify: fixed 4 of 4" in fixed.stdout
    assert not flipped.exists() and not orphan.exists() and not stray.exists()
    store = Store(cache)
    try:
        assert store.get_crate_meta("flipped", "1.0.0") is None
        assert store.get_crate_meta("gone", "1.0.0") is None
        assert store.get_crate_meta("fine", "1.0.0") is not None
    finally:
        store.close()

    after = await run_cli("verify", "--config", str(config), cwd=tmp_path)
    assert after.code == 0, after.output
    assert (
        after.stdout.splitlines()[-1]
        == f"verify: 2 crate files checked: 2 ok, 0 corrupt, 0 orphaned; {NO_MISSING}"
    )

    # The running mirror fetches the removed ones again, with the right bytes.
    for name in ("flipped", "gone"):
        response = await client.get(f"/api/v1/crates/{name}/1.0.0/download")
        assert response.status == 200 and await response.read() == crates[name].data
        assert response.headers["X-Cache"] == "MISS"
    assert registry.count("/crates/flipped/1.0.0/download") == 2


async def test_verify_on_a_missing_cache_dir_is_a_config_error(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, tmp_path / "no-such-cache")
    result = await run_cli("verify", "--config", str(config), cwd=tmp_path)
    assert result.code == 2, result.output
    assert "cache.dir: expected an existing cache directory" in result.stderr
    assert not (tmp_path / "no-such-cache").exists()
