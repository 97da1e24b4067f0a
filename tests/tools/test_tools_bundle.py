"""`cratemirror export` / `import`: a working set moved to an offline mirror; tampered bundles refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

from cratemirror.cache.index import UPSTREAM_CONFIG_KEY
from cratemirror.fleet.storage.disk import Store
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry
from tests.tools_support import (
    CRATES_IO,
    cargo_fetch_through,
    crate_file,
    publish_sample,
    real_lockfile,
    run_cli,
    seed_cache,
    write_config,
)

DAY = 86400.0


def read_bundle(bundle: Path) -> tuple[dict[str, bytes], dict[str, object]]:
    with tarfile.open(bundle) as tar:
        members = {}
        for member in tar.getmembers():
            handle = tar.extractfile(member)
            assert handle is not None
            members[member.name] = handle.read()
    return members, json.loads(members["manifest.json"])


def find_files(root: Path, pattern: str) -> list[Path]:
    return list(root.rglob(pattern))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


async def test_export_import_then_offline_mirror_serves_cargo(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    expected = publish_sample(registry)
    registry.add_crate("unrelated", "1.0.0")
    project = await real_lockfile(tmp_path, registry)
    source, target = tmp_path / "source-cache", tmp_path / "target-cache"
    source_config = write_config(tmp_path / "source.yaml", registry.index_url, source)
    warm = await run_cli("warm", str(project / "Cargo.lock"), "--config", str(source_config), cwd=tmp_path)
    assert warm.code == 0, warm.output
    seed_cache(source, registry, {"unrelated": "1.0.0"}, fetched_at=time.time())

    bundle = tmp_path / "working-set.tar"
    exported = await run_cli(
        "export", str(bundle), "--config", str(source_config), "--lockfile", str(project / "Cargo.lock"),
        cwd=tmp_path,
    )  # fmt: skip
    print(exported.output)
    assert exported.code == 0, exported.output
    assert exported.stdout.splitlines()[-1].startswith("export: 4 crates (")
    assert exported.stdout.splitlines()[-1].endswith(f"and 4 index files -> {bundle}")
    members, manifest = read_bundle(bundle)
    assert manifest["format"] == "cratemirror-bundle" and manifest["format_version"] == 1
    assert manifest["upstream_config"] == {"dl": registry.dl_url()}
    entries = manifest["crates"]
    assert isinstance(entries, list)
    assert {(entry["name"], entry["version"]) for entry in entries} == set(expected.items())
    for entry in entries:
        cv = registry.get_version(entry["name"], entry["version"])
        assert entry["sha256"] == cv.cksum and entry["size"] == len(cv.data) and entry["fetched_at"] > 0
        assert members[f"crates/{cv.name}/{cv.name}-{cv.vers}.crate"] == cv.data
    assert members["index/in/fl/inflect"] == registry.index_file("Inflect")
    assert not any("unrelated" in name for name in members)

    target_config = write_config(tmp_path / "target.yaml", registry.index_url, target)
    imported = await run_cli("import", str(bundle), "--config", str(target_config), cwd=tmp_path)
    print(imported.output)
    assert imported.code == 0, imported.output
    assert imported.stdout.splitlines()[-1].startswith("import: 4 crates in the bundle: 4 loaded")
    store = Store(target)
    try:
        assert store.get_json(UPSTREAM_CONFIG_KEY) == {"dl": registry.dl_url()}
    finally:
        store.close()

    # Importing again changes nothing.
    again = await run_cli("import", str(bundle), "--config", str(target_config), cwd=tmp_path)
    assert again.code == 0, again.output
    assert "0 loaded (0 B), 4 already cached, 0 refused" in again.stdout

    # With the upstream stopped, an offline mirror on the imported cache serves the real cargo.
    await registry.stop()
    client = await mirror_factory(cache_dir=target, offline=True)
    await cargo_fetch_through(client, project, tmp_path / "cargo-home-offline")


async def test_export_selection_since_and_missing_lockfile_crates(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    fresh = registry.add_crate("fresh", "1.0.0")
    stale = registry.add_crate("stale", "1.0.0")
    cache = tmp_path / "cache"
    seed_cache(cache, registry, {"fresh": "1.0.0"}, fetched_at=time.time())
    seed_cache(cache, registry, {"stale": "1.0.0"}, fetched_at=time.time() - 60 * DAY)
    old = time.time() - 60 * DAY
    stale_file = crate_file(cache, "stale", "1.0.0")
    os.utime(stale_file, (old, old))
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, cache)

    recent = await run_cli(
        "export", str(tmp_path / "recent.tar"), "--config", str(config), "--since", "30d", cwd=tmp_path
    )
    assert recent.code == 0, recent.output
    members, _ = read_bundle(tmp_path / "recent.tar")
    assert set(members) == {"crates/fresh/fresh-1.0.0.crate", "index/fr/es/fresh", "manifest.json"}

    everything = await run_cli("export", str(tmp_path / "all.tar"), "--config", str(config), cwd=tmp_path)
    assert everything.code == 0, everything.output
    members, manifest = read_bundle(tmp_path / "all.tar")
    assert members["crates/stale/stale-1.0.0.crate"] == stale.data
    assert manifest["upstream_config"] is None  # never fetched in this cache

    lockfile = tmp_path / "Cargo.lock"
    lockfile.write_text(
        f'version = 4\n\n[[package]]\nname = "fresh"\nversion = "1.0.0"\nsource = "{CRATES_IO}"\n'
        f'checksum = "{fresh.cksum}"\n\n'
        f'[[package]]\nname = "absent"\nversion = "2.0.0"\nsource = "{CRATES_IO}"\n'
    )
    other = tmp_path / "other.lock"
    other.write_text(f'[[package]]\nname = "stale"\nversion = "1.0.0"\nsource = "{CRATES_IO}"\n')
    partial = await run_cli(
        "export", str(tmp_path / "partial.tar"), "--config", str(config),
        "--lockfile", str(lockfile), str(other), cwd=tmp_path,
    )  # fmt: skip
    assert partial.code == 1, partial.output
    assert "export: MISSING absent 2.0.0: not in the cache" in partial.stderr
    assert "1 crate left out" in partial.stdout
    members, _ = read_bundle(tmp_path / "partial.tar")
    assert {name for name in members if name.startswith("crates/")} == {
        "crates/fresh/fresh-1.0.0.crate",
        "crates/stale/stale-1.0.0.crate",
    }

    bad = await run_cli(
        "export", str(tmp_path / "x.tar"), "--config", str(config), "--since", "soon", cwd=tmp_path
    )
    assert bad.code == 2 and "--since: expected a duration like 30d" in bad.stderr, bad.output
    assert not (tmp_path / "x.tar").exists()


async def test_import_refuses_a_tampered_bundle(registry: FakeRegistry, tmp_path: Path) -> None:
    crates = {name: registry.add_crate(name, "1.0.0") for name in ("bytes-changed", "both-changed", "intact")}
    source = tmp_path / "source"
    seed_cache(source, registry, {name: "1.0.0" for name in crates}, fetched_at=time.time())
    source_config = write_config(tmp_path / "source.yaml", registry.index_url, source)
    bundle = tmp_path / "good.tar"
    exported = await run_cli("export", str(bundle), "--config", str(source_config), cwd=tmp_path)
    assert exported.code == 0, exported.output

    members, manifest = read_bundle(bundle)
    evil_bytes = {}
    for name in ("bytes-changed", "both-changed"):
        key = f"crates/{name}/{name}-1.0.0.crate"
        data = bytearray(members[key])
        data[len(data) // 2] ^= 0x01
        members[key] = evil_bytes[name] = bytes(data)
    # The second one also has its manifest entry "fixed up": its index line's cksum still gives it away.
    entries = manifest["crates"]
    assert isinstance(entries, list)
    for entry in entries:
        if entry["name"] == "both-changed":
            entry["sha256"] = hashlib.sha256(evil_bytes["both-changed"]).hexdigest()
    members["manifest.json"] = json.dumps(manifest).encode()
    outside = tmp_path / "outside-absolute.txt"
    tampered = tmp_path / "tampered.tar"
    write_tar(
        tampered,
        [
            *members.items(),
            ("../escaped.txt", b"written outside the cache?"),
            (str(outside), b"absolute path"),
            ("crates/../../escaped-too.crate", b"dot dot"),
        ],
    )

    target = tmp_path / "target"
    target_config = write_config(tmp_path / "target.yaml", registry.index_url, target)
    result = await run_cli("import", str(tampered), "--config", str(target_config), cwd=tmp_path)
    print(result.output)
    assert result.code == 1, result.output
    assert (
        "REFUSED bytes-changed 1.0.0: bytes hash to" in result.stderr and "the manifest says" in result.stderr
    )
    assert (
        "REFUSED both-changed 1.0.0: bytes hash to" in result.stderr and "index line's cksum" in result.stderr
    )
    assert "REFUSED '../escaped.txt': path outside the bundle" in result.stderr
    assert f"REFUSED '{outside}': path outside the bundle" in result.stderr
    assert "REFUSED 'crates/../../escaped-too.crate': path outside the bundle" in result.stderr
    assert "3 crates in the bundle: 1 loaded" in result.stdout and "2 refused" in result.stdout

    assert not outside.exists()
    assert not (tmp_path / "escaped.txt").exists() and not (target / "escaped.txt").exists()
    assert not find_files(tmp_path, "escaped*")
    assert crate_file(target, "intact", "1.0.0").read_bytes() == crates["intact"].data
    store = Store(target)
    try:
        for name in ("bytes-changed", "both-changed"):
            assert not crate_file(target, name, "1.0.0").exists()
            assert store.get_crate_meta(name, "1.0.0") is None
        assert store.get_crate_meta("intact", "1.0.0") is not None
    finally:
        store.close()
    assert not list((target / "tmp").iterdir())  # no temp files left behind


async def test_import_rejects_what_is_not_a_bundle(registry: FakeRegistry, tmp_path: Path) -> None:
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, tmp_path / "cache")
    write_tar(tmp_path / "plain.tar", [("hello.txt", b"hi")])
    (tmp_path / "garbage.tar").write_bytes(b"\x00not a tar at all" * 100)
    plain = await run_cli("import", str(tmp_path / "plain.tar"), "--config", str(config), cwd=tmp_path)
    assert plain.code == 1 and "no manifest.json: not a cratemirror bundle" in plain.stderr, plain.output
    garbage = await run_cli("import", str(tmp_path / "garbage.tar"), "--config", str(config), cwd=tmp_path)
    assert garbage.code == 1, garbage.output
    missing = await run_cli("import", str(tmp_path / "nope.tar"), "--config", str(config), cwd=tmp_path)
    assert missing.code == 2 and "nope.tar: expected a bundle file" in missing.stderr, missing.output
