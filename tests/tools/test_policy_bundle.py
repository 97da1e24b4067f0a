"""The advisory db across an air gap: `export --advisory-db` carries it, `import` installs it into the
offline mirror's policy.advisory_db, which then enforces it; hostile bundle entries are refused whole."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry
from tests.policy_support import LEAF_ADVISORY, publish_policy_tree, synthetic_db, write_advisory
from tests.tools_support import run_cli, seed_cache, write_config


def with_policy(config: Path, db: Path) -> Path:
    config.write_text(config.read_text() + f"policy:\n  mode: enforce\n  advisory_db: {db}\n")
    return config


async def test_the_advisory_db_travels_with_the_bundle(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    publish_policy_tree(registry)
    source_db = synthetic_db(tmp_path / "source-db")
    source = with_policy(
        write_config(tmp_path / "source.yaml", registry.index_url, tmp_path / "a"), source_db
    )
    seed_cache(tmp_path / "a", registry, {"leaf": "0.3.1"}, fetched_at=time.time())
    bundle = tmp_path / "bundle.tar"
    exported = await run_cli("export", str(bundle), "--config", str(source), "--advisory-db", cwd=tmp_path)
    assert exported.code == 0, exported.output
    assert exported.stdout.strip().endswith(f"and 3 advisories -> {bundle}")

    target_db = tmp_path / "offline-db"
    target = with_policy(
        write_config(tmp_path / "target.yaml", registry.index_url, tmp_path / "b"), target_db
    )
    imported = await run_cli("import", str(bundle), "--config", str(target), cwd=tmp_path)
    assert imported.code == 0, imported.output
    assert f"3 advisories installed into {target_db}" in imported.stdout
    for path in source_db.rglob("*.md"):
        assert (target_db / path.relative_to(source_db)).read_bytes() == path.read_bytes()

    registry.down = True
    offline = await mirror_factory(
        cache_dir=tmp_path / "b", offline=True, policy__mode="enforce", policy__advisory_db=target_db
    )
    assert (await offline.get("/api/v1/crates/leaf/0.3.1/download")).status == 200
    refused = await offline.get("/api/v1/crates/leaf/0.3.2/download")
    assert refused.status == 403 and refused.headers["X-Cratemirror-Policy"] == LEAF_ADVISORY


def _bundle(path: Path, files: list[tuple[str, bytes]], listed: list[dict[str, object]]) -> None:
    manifest = {
        "format": "cratemirror-bundle", "format_version": 1, "created": "", "created_by": "test",
        "upstream_config": None, "crates": [], "index_files": [], "advisory_db": {"files": listed},
    }  # fmt: skip
    with tarfile.open(path, "w") as tar:
        for name, body in [*files, ("manifest.json", json.dumps(manifest).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


async def test_hostile_advisory_entries_refuse_the_whole_db(registry: FakeRegistry, tmp_path: Path) -> None:
    good = b"```toml\n[advisory]\n```\n"
    digest = hashlib.sha256(good).hexdigest()
    target_db = tmp_path / "db"
    (target_db / "crates" / "keep").mkdir(parents=True)
    kept = target_db / "crates" / "keep" / "RUSTSEC-2099-0100.md"
    kept.write_text("the db in place before the import")
    config = with_policy(write_config(tmp_path / "m.yaml", registry.index_url, tmp_path / "cache"), target_db)
    cases = {
        "traversal": "crates/../../etc/RUSTSEC-2099-0001.md",
        "bad-name": "crates/bad name/RUSTSEC-2099-0001.md",
        "bad-file": "crates/leaf/notes.md",
        "deep": "crates/leaf/x/RUSTSEC-2099-0001.md",
    }
    for label, path in cases.items():
        bundle = tmp_path / f"{label}.tar"
        _bundle(
            bundle,
            [("advisory-db/crates/leaf/RUSTSEC-2099-0002.md", good), (f"advisory-db/{path}", good)],
            [
                {"path": "crates/leaf/RUSTSEC-2099-0002.md", "sha256": digest, "size": len(good)},
                {"path": path, "sha256": digest, "size": len(good)},
            ],
        )
        result = await run_cli("import", str(bundle), "--config", str(config), cwd=tmp_path)
        assert result.code == 1, (label, result.output)
        assert "advisory db: not installed" in result.stderr, (label, result.output)
        assert kept.read_text() == "the db in place before the import"
        assert not (target_db / "crates" / "leaf").exists()
    # Bytes that do not hash to the manifest's sha256: refused too.
    bundle = tmp_path / "tampered.tar"
    _bundle(
        bundle,
        [("advisory-db/crates/leaf/RUSTSEC-2099-0002.md", good + b"x")],
        [{"path": "crates/leaf/RUSTSEC-2099-0002.md", "sha256": digest, "size": len(good)}],
    )
    result = await run_cli("import", str(bundle), "--config", str(config), cwd=tmp_path)
    assert result.code == 1 and "does not hash" in result.stderr, result.output
    assert not (tmp_path / "etc").exists()


def _advisory_bundle(path: Path, source: Path) -> None:
    """A bundle carrying every advisory file of `source` (none: an empty advisory_db section)."""
    files = [
        (f"advisory-db/{file.relative_to(source)}", file.read_bytes())
        for file in sorted(source.rglob("*.md"))
    ]
    listed: list[dict[str, object]] = [
        {
            "path": name.removeprefix("advisory-db/"),
            "sha256": hashlib.sha256(body).hexdigest(),
            "size": len(body),
        }
        for name, body in files
    ]
    _bundle(path, files, listed)


async def test_a_bundle_never_wipes_or_rolls_back_the_advisory_db(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    target_db = synthetic_db(tmp_path / "db")  # newest advisory 2099-01-02
    before = {path: path.read_bytes() for path in target_db.rglob("*.md")}
    config = with_policy(write_config(tmp_path / "m.yaml", registry.index_url, tmp_path / "cache"), target_db)
    empty = tmp_path / "empty.tar"
    _advisory_bundle(empty, tmp_path / "nothing")
    older_db = tmp_path / "older"
    write_advisory(older_db, "leaf", "RUSTSEC-2098-0001", date="2098-05-05")
    older = tmp_path / "older.tar"
    _advisory_bundle(older, older_db)

    for bundle, why in ((empty, "no readable advisory"), (older, "older than the newest")):
        result = await run_cli("import", str(bundle), "--config", str(config), cwd=tmp_path)
        assert result.code == 1, result.output
        assert why in result.stderr and "--replace-advisory-db" in result.stderr, result.output
        assert {path: path.read_bytes() for path in target_db.rglob("*.md")} == before

    # The good path: a newer db installs and says what it changed.
    newer_db = synthetic_db(tmp_path / "newer")
    write_advisory(newer_db, "top", "RUSTSEC-2099-0050", date="2099-03-03")
    newer = tmp_path / "newer.tar"
    _advisory_bundle(newer, newer_db)
    result = await run_cli("import", str(newer), "--config", str(config), cwd=tmp_path)
    assert result.code == 0, result.output
    assert "4 advisories installed" in result.stdout
    assert "1 added, 0 removed, 0 rewritten; newest advisory 2099-01-02 -> 2099-03-03" in result.stdout
    # The operator may still roll back or empty it, on purpose.
    result = await run_cli(
        "import", str(older), "--config", str(config), "--replace-advisory-db", cwd=tmp_path
    )
    assert result.code == 0, result.output
    assert "1 added, 4 removed" in result.stdout and "2099-03-03 -> 2098-05-05" in result.stdout
    assert [path.name for path in target_db.rglob("*.md")] == ["RUSTSEC-2098-0001.md"]
