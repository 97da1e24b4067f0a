"""The operator tools against storage.backend s3: moto's real S3 server on loopback, driven through the
same aiobotocore client code a MinIO or AWS bucket would see."""

from __future__ import annotations

import asyncio
import hashlib
import tarfile
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp

from cratemirror.cache.index import body_etag
from cratemirror.config.schema import S3Config
from cratemirror.fleet.storage.disk import IndexEntry
from cratemirror.fleet.storage.s3 import S3Shared
from cratemirror.names import parse_crate_version, parse_name
from tests.fake_upstream import FakeRegistry
from tests.fleet_support import MotoS3, replicas, set_stored_at
from tests.tools_support import CRATES_IO, run_cli, write_config


def s3_config(moto: MotoS3, bucket: str | None = None) -> S3Config:
    return S3Config(
        bucket=bucket or moto.bucket, endpoint_url=moto.endpoint, region="us-east-1",
        access_key_id=moto.ACCESS_KEY, secret_access_key=moto.SECRET_KEY, integrity_key=moto.INTEGRITY_KEY,
    )  # fmt: skip


async def seed_bucket(moto: MotoS3, registry: FakeRegistry, crates: list[tuple[str, str]], tmp: Path) -> None:
    """Store crates and their index files as a replica's fill does: S3Shared.put_crate / put_index."""
    shared = S3Shared(s3_config(moto), 64 * 1024 * 1024)
    await shared.start()
    try:
        for name, version in crates:
            cv = registry.get_version(name, version)
            temp = tmp / f"{name}-{version}.crate"
            temp.write_bytes(cv.data)
            await shared.put_crate(parse_crate_version(name, version), temp, cv.cksum)
            body = registry.index_file(name)
            now = time.time()
            entry = IndexEntry(200, body, body_etag(body), "Tue, 01 Dec 2026 00:00:00 GMT", now)
            await shared.put_index(parse_name(name), entry)
    finally:
        await shared.close()


def tool_config(tmp_path: Path, registry: FakeRegistry, moto: MotoS3, name: str = "tools") -> Path:
    config = write_config(tmp_path / f"{name}.yaml", registry.index_url, tmp_path / f"{name}-cache")
    config.write_text(config.read_text() + moto.yaml())
    return config


async def test_verify_finds_a_replaced_object_and_fix_deletes_it(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    crates = [("serde", "1.0.0"), ("rand", "0.8.5"), ("libc", "0.2.1")]
    for name, version in crates:
        registry.add_crate(name, version)
    await seed_bucket(moto, registry, crates, tmp_path)
    config = tool_config(tmp_path, registry, moto)

    clean = await run_cli("verify", "--config", str(config), cwd=tmp_path)
    assert clean.code == 0, clean.output
    assert "verify: 3 crate objects in the bucket checked: 3 ok, 0 corrupt" in clean.stdout, clean.output

    # Bytes replaced behind the mirror's back (the authentic record kept), with the raw client.
    client = moto.client()
    good = registry.get_version("rand", "0.8.5")
    record = (await asyncio.to_thread(client.head_object, Bucket=moto.bucket, Key="crates/rand/0.8.5.crate"))[
        "Metadata"
    ]
    await asyncio.to_thread(
        client.put_object, Bucket=moto.bucket, Key="crates/rand/0.8.5.crate",
        Body=good.data[:20] + bytes([good.data[20] ^ 0xFF]) + good.data[21:], Metadata=record,
    )  # fmt: skip
    # ... and another one's bytes and record both replaced: the record hashes right but is not the fleet's.
    evil = b"evil crate bytes"
    await asyncio.to_thread(
        client.put_object, Bucket=moto.bucket, Key="crates/libc/0.2.1.crate", Body=evil,
        Metadata={"sha256": hashlib.sha256(evil).hexdigest()},
    )  # fmt: skip
    found = await run_cli("verify", "--config", str(config), cwd=tmp_path)
    assert found.code == 1, found.output
    assert "CORRUPT rand 0.8.5: bytes hash to" in found.output, found.output
    assert "UNAUTHENTICATED libc 0.2.1: no sha256 recorded" in found.output, found.output
    assert "1 ok, 1 corrupt, 1 unauthenticated" in found.stdout, found.output

    fixed = await run_cli("verify", "--fix", "--config", str(config), cwd=tmp_path)
    assert fixed.code == 0, fixed.output
    keys = await asyncio.to_thread(moto.object_keys)
    assert sorted(k for k in keys if k.startswith("crates/")) == ["crates/serde/1.0.0.crate"]
    again = await run_cli("verify", "--config", str(config), cwd=tmp_path)
    assert again.code == 0 and "1 ok, 0 corrupt, 0 unauthenticated" in again.stdout, again.output


async def test_prune_deletes_the_oldest_objects_down_to_the_size(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    # Ages run against name order, so a prune by key would pick the wrong ones.
    crates = [("a", "1.0.0"), ("b", "1.0.0"), ("c", "1.0.0"), ("d", "1.0.0")]
    days_old = {"a": 1, "b": 3, "c": 4, "d": 2}
    for name, version in crates:
        registry.add_crate(name, version)
    await seed_bucket(moto, registry, crates, tmp_path)
    for name, age in days_old.items():
        await asyncio.to_thread(set_stored_at, moto, f"crates/{name}/1.0.0.crate", time.time() - age * 86400)
    sizes = {name: len(registry.get_version(name, "1.0.0").data) for name, _ in crates}
    config = tool_config(tmp_path, registry, moto)
    max_size = str(sizes["a"] + sizes["d"])  # room for the two newest only

    dry = await run_cli("prune", "--config", str(config), "--max-size", max_size, "--dry-run", cwd=tmp_path)
    assert dry.code == 0, dry.output
    assert [line.split()[3] for line in dry.stdout.splitlines() if "would remove c" in line or
            "would remove b" in line] == ["c", "b"], dry.output  # fmt: skip
    assert "dry run: would remove 2 crates" in dry.stdout, dry.output
    assert len([k for k in await asyncio.to_thread(moto.object_keys) if k.startswith("crates/")]) == 4

    pruned = await run_cli("prune", "--config", str(config), "--max-size", max_size, cwd=tmp_path)
    assert pruned.code == 0, pruned.output
    assert "removed 2 crates" in pruned.stdout, pruned.output
    keys = await asyncio.to_thread(moto.object_keys)
    assert sorted(k for k in keys if k.startswith("crates/")) == [
        "crates/a/1.0.0.crate",
        "crates/d/1.0.0.crate",
    ]
    assert sum(k.startswith("index/") for k in keys) == 4  # index files stay

    again = await run_cli("prune", "--config", str(config), "--max-size", max_size, cwd=tmp_path)
    assert again.code == 0 and "nothing to remove" in again.stdout, again.output
    unbounded = await run_cli("prune", "--config", str(config), cwd=tmp_path)
    assert unbounded.code == 2 and "--max-size" in unbounded.stderr, unbounded.output


async def test_export_from_a_bucket_import_into_another_then_a_replica_serves_hits_offline(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    crates = [("serde", "1.0.0"), ("serde", "1.0.1"), ("Inflect", "0.1.0"), ("b", "0.2.1+build.5")]
    for name, version in crates:
        registry.add_crate(name, version)
    registry.add_crate("junk", "1.0.0")
    await seed_bucket(moto, registry, [*crates, ("junk", "1.0.0")], tmp_path)
    junk = registry.get_version("junk", "1.0.0")
    await asyncio.to_thread(
        moto.client().put_object, Bucket=moto.bucket, Key="crates/junk/1.0.0.crate",
        Body=junk.data[:20] + bytes([junk.data[20] ^ 0xFF]) + junk.data[21:], Metadata={"sha256": junk.cksum},
    )  # fmt: skip
    source = tool_config(tmp_path, registry, moto, "source")
    bundle = tmp_path / "working-set.tar"
    exported = await run_cli("export", str(bundle), "--config", str(source), cwd=tmp_path)
    assert exported.code == 1, exported.output  # one crate left out
    assert "SKIPPED junk 1.0.0: the object is corrupt" in exported.stderr, exported.output
    assert "export: 4 crates (" in exported.stdout and "and 3 index files" in exported.stdout, exported.output
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
    assert {
        "crates/serde/serde-1.0.0.crate", "crates/Inflect/Inflect-0.1.0.crate",
        "crates/b/b-0.2.1+build.5.crate", "index/se/rd/serde", "index/in/fl/inflect", "index/1/b",
    } <= names and not any("junk" in name for name in names), names  # fmt: skip

    second = f"{moto.bucket}-2"
    await asyncio.to_thread(moto.client().create_bucket, Bucket=second)
    target_yaml = moto.yaml().replace(moto.bucket, second)
    target = write_config(tmp_path / "target.yaml", registry.index_url, tmp_path / "target-cache")
    target.write_text(target.read_text() + target_yaml)
    imported = await run_cli("import", str(bundle), "--config", str(target), cwd=tmp_path)
    assert imported.code == 0, imported.output
    assert "4 loaded" in imported.stdout and "3 index files loaded" in imported.stdout, imported.output
    again = await run_cli("import", str(bundle), "--config", str(target), cwd=tmp_path)
    assert again.code == 0 and "0 loaded (0 B), 4 already cached" in again.stdout, again.output
    listing = await asyncio.to_thread(moto.client().list_objects_v2, Bucket=second)
    keys = sorted(item["Key"] for item in listing["Contents"])
    assert [key for key in keys if key.startswith("crates/")] == [
        "crates/Inflect/0.1.0.crate", "crates/b/0.2.1%2Bbuild.5.crate",
        "crates/serde/1.0.0.crate", "crates/serde/1.0.1.crate",
    ]  # fmt: skip

    registry.down = True
    registry.reset_counts()
    (tmp_path / "fleet").mkdir()
    async with (
        replicas(registry.index_url, tmp_path / "fleet", 1, config_text=target_yaml) as (mirror,),
        aiohttp.ClientSession() as session,
    ):
        for name, version in crates:
            url = f"{mirror.url}/api/v1/crates/{name}/{quote(version, safe='')}/download"
            async with session.get(url) as response:
                body = await response.read()
                assert (response.status, response.headers.get("X-Cache")) == (200, "HIT"), (name, body[:200])
            assert body == registry.get_version(name, version).data, name
    assert registry.requests.total() == 0, dict(registry.requests)


async def test_export_from_a_bucket_by_lockfile_and_verify_leaves_other_objects_alone(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    """One export and one verify for both backends: --lockfile selects from the bucket as from a cache
    dir (case-folded names included), and an object this mirror never wrote is counted, never deleted."""
    crates = [("Inflect", "0.1.0"), ("serde", "1.0.0"), ("rand", "0.8.5")]
    for name, version in crates:
        registry.add_crate(name, version)
    await seed_bucket(moto, registry, crates, tmp_path)
    inflect = registry.get_version("Inflect", "0.1.0")
    lockfile = tmp_path / "Cargo.lock"
    lockfile.write_text(
        f'version = 4\n\n[[package]]\nname = "inflect"\nversion = "0.1.0"\nsource = "{CRATES_IO}"\n'
        f'checksum = "{inflect.cksum}"\n\n'
        f'[[package]]\nname = "absent"\nversion = "2.0.0"\nsource = "{CRATES_IO}"\n'
    )
    config = tool_config(tmp_path, registry, moto)
    bundle = tmp_path / "locked.tar"
    exported = await run_cli(
        "export", str(bundle), "--config", str(config), "--lockfile", str(lockfile), cwd=tmp_path
    )
    assert exported.code == 1, exported.output
    assert "export: MISSING absent 2.0.0" in exported.stderr, exported.output
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
    assert names == {"crates/Inflect/Inflect-0.1.0.crate", "index/in/fl/inflect", "manifest.json"}, names

    await asyncio.to_thread(
        moto.client().put_object, Bucket=moto.bucket, Key="crates/notes/README.txt", Body=b"someone else's"
    )
    found = await run_cli("verify", "--fix", "--config", str(config), cwd=tmp_path)
    assert found.code == 0, found.output
    assert (
        "verify: 3 crate objects in the bucket checked: 3 ok, 0 corrupt, 0 unauthenticated; "
        "1 other object under crates/ left alone"
    ) in found.stdout, found.output
    assert "crates/notes/README.txt" in await asyncio.to_thread(moto.object_keys)
