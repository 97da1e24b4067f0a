"""Issue 9 item 5: a bundle comes from another network. Forged manifest fields cannot pin an index
file, break its headers, or make `import` hold a huge or deeply nested manifest."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path
from tests.tools_support import CliResult, run_cli, seed_cache, write_config

YEAR = 365 * 86400.0


def rewrite_bundle(source: Path, target: Path, change: dict[str, bytes]) -> None:
    with tarfile.open(source) as tar_in, tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar_out:
        for member in tar_in.getmembers():
            handle = tar_in.extractfile(member)
            assert handle is not None
            body = change.get(member.name, handle.read())
            info = tarfile.TarInfo(member.name)
            info.size = len(body)
            tar_out.addfile(info, io.BytesIO(body))


def read_member(bundle: Path, name: str) -> bytes:
    with tarfile.open(bundle) as tar:
        handle = tar.extractfile(name)
        assert handle is not None
        return handle.read()


async def test_forged_manifest_fields_cannot_pin_or_break_an_index_file(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    registry.add_crate("pinned", "1.0.0")
    source = tmp_path / "source"
    seed_cache(source, registry, {"pinned": "1.0.0"}, fetched_at=time.time())
    bundle = tmp_path / "good.tar"
    config = write_config(tmp_path / "source.yaml", registry.index_url, source)
    assert (await run_cli("export", str(bundle), "--config", str(config), cwd=tmp_path)).code == 0

    manifest = json.loads(read_member(bundle, "manifest.json"))
    with tarfile.open(bundle) as tar:
        member = next(name for name in tar.getnames() if name.startswith("index/"))
    forged = registry.index_file("pinned").replace(b'"yanked":false', b'"yanked":true')
    assert forged != registry.index_file("pinned")
    for entry in manifest["index_files"]:
        entry["sha256"] = hashlib.sha256(forged).hexdigest()
        entry["checked_at"] = time.time() + 10 * YEAR  # "fresh" for ten years
        entry["last_modified"] = "Mon, 01 Jan 2024 00:00:00 GMT\r\nX-Injected: 1"
        entry["upstream_etag"] = '"the-upstream-real-etag"'
    tampered = tmp_path / "tampered.tar"
    rewrite_bundle(bundle, tampered, {"manifest.json": json.dumps(manifest).encode(), member: forged})

    target = tmp_path / "target"
    target_config = write_config(tmp_path / "target.yaml", registry.index_url, target)
    result = await run_cli("import", str(tampered), "--config", str(target_config), cwd=tmp_path)
    assert result.code == 0, result.output

    offline = await mirror_factory(cache_dir=target, offline=True)
    async with offline.get("/index/" + index_path("pinned")) as response:
        assert response.status == 200  # servable: the broken date was dropped, not sent
        assert "\r" not in response.headers["Last-Modified"] and "X-Injected" not in response.headers
        assert await response.read() == forged  # offline serves what was imported, as it should
    await offline.close()

    online = await mirror_factory(cache_dir=target, cache__index_ttl=0.0)
    registry.reset_counts()
    async with online.get("/index/" + index_path("pinned")) as response:
        assert response.status == 200
        # Revalidated with upstream (no forged date keeps it fresh, no forged ETag earns a 304).
        assert await response.read() == registry.index_file("pinned")
    assert registry.count(index_path("pinned")) == 1


async def test_a_manifest_that_is_nested_deeply_or_not_json_is_refused_in_one_line(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, tmp_path / "cache")
    cases = {
        "nested.tar": b"[" * 200_000 + b"]" * 200_000,
        "binary.tar": b"\xff\xfe\x00garbage",
    }
    for name, manifest in cases.items():
        with tarfile.open(tmp_path / name, "w") as tar:
            info = tarfile.TarInfo("manifest.json")
            info.size = len(manifest)
            tar.addfile(info, io.BytesIO(manifest))
        result = await run_cli("import", str(tmp_path / name), "--config", str(config), cwd=tmp_path)
        assert result.code == 1, result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr and "manifest.json" in result.stderr
    assert not (tmp_path / "cache" / "crates").exists() or not any((tmp_path / "cache" / "crates").iterdir())


async def export_then_import_capped(
    registry: FakeRegistry, tmp_path: Path, crates: dict[str, str], cap: str
) -> CliResult:
    """Export `crates` from a seeded cache, import the bundle into tmp_path/target with `cap` (an
    `upstream:` line) in its config."""
    source = tmp_path / "source"
    seed_cache(source, registry, crates, fetched_at=time.time())
    bundle = tmp_path / "bundle.tar"
    config = write_config(tmp_path / "source.yaml", registry.index_url, source)
    assert (await run_cli("export", str(bundle), "--config", str(config), cwd=tmp_path)).code == 0
    target_config = write_config(tmp_path / "target.yaml", registry.index_url, tmp_path / "target")
    target_config.write_text(target_config.read_text().replace("upstream:\n", f"upstream:\n  {cap}\n"))
    return await run_cli("import", str(bundle), "--config", str(target_config), cwd=tmp_path)


async def test_index_members_over_the_configured_cap_are_refused(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    for minor in range(12):
        registry.add_crate("wide", f"1.{minor}.0")
    assert len(registry.index_file("wide")) > 1024
    result = await export_then_import_capped(registry, tmp_path, {"wide": "1.11.0"}, "max_index_size: 1KiB")
    assert result.code == 1, result.output
    assert "REFUSED index file of wide:" in result.stderr and "over 1.0 KiB" in result.stderr, result.stderr
    assert "0 loaded" in result.stdout, result.stdout


async def test_crate_members_over_the_configured_cap_are_refused_before_a_copy(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    registry.add_crate("small", "1.0.0")
    registry.add_crate("big", "1.0.0", pad_to=64 * 1024)
    crates = {"small": "1.0.0", "big": "1.0.0"}
    result = await export_then_import_capped(registry, tmp_path, crates, "max_crate_size: 32KiB")
    target = tmp_path / "target"
    assert result.code == 1, result.output
    assert "REFUSED big 1.0.0:" in result.stderr and "over 32.0 KiB" in result.stderr, result.stderr
    assert "1 loaded" in result.stdout, result.stdout
    assert (target / "crates" / "small" / "small-1.0.0.crate").is_file()
    assert not (target / "crates" / "big").exists()
    assert list((target / "tmp").iterdir()) == []  # nothing was copied for it
