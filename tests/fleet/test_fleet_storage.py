"""The S3 storage seam against moto's real S3 server, through the same aiobotocore client a MinIO or
AWS deployment uses: verified uploads, verified downloads, presigned redirects, index files."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from cratemirror.config.schema import StorageConfig
from cratemirror.fleet.storage import SharedStorage, make_shared_storage
from cratemirror.fleet.storage.disk import IndexEntry
from cratemirror.names import CrateName, CrateVersion
from tests.fleet_support import MotoS3

LIMIT = 1 << 20


def storage_config(
    moto: MotoS3, serve: str = "proxy", prefix: str = "m/", integrity_key: str | None = None
) -> StorageConfig:
    return StorageConfig.model_validate(
        {
            "backend": "s3",
            "s3": {
                "bucket": moto.bucket, "prefix": prefix, "endpoint_url": moto.endpoint, "region": "us-east-1",
                "access_key_id": moto.ACCESS_KEY, "secret_access_key": moto.SECRET_KEY, "serve": serve,
                "integrity_key": integrity_key or moto.INTEGRITY_KEY,
            },
        }
    )  # fmt: skip


@pytest.fixture
async def shared(moto: MotoS3) -> AsyncIterator[SharedStorage]:
    storage = make_shared_storage(storage_config(moto, serve="redirect"), LIMIT)
    await storage.start()
    try:
        yield storage
    finally:
        await storage.close()


def crate_file(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    path = tmp_path / "verified.crate"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


KEY = CrateVersion(CrateName("Serde_json"), "1.0.0+build.5")


async def test_a_stored_crate_comes_back_verified(shared: SharedStorage, tmp_path: Path) -> None:
    data = b"crate bytes" * 1000
    path, sha = crate_file(tmp_path, data)
    assert await shared.fetch_crate(KEY, sha, tmp_path / "out", LIMIT) is None  # not there yet
    await shared.put_crate(KEY, path, sha)
    await shared.put_crate(KEY, path, sha)  # a second writer: refused by If-None-Match, no error
    assert await shared.fetch_crate(KEY, sha, tmp_path / "out", LIMIT) == len(data)
    assert (tmp_path / "out").read_bytes() == data
    # Bytes that do not hash to the index cksum are never handed out.
    assert await shared.fetch_crate(KEY, "0" * 64, tmp_path / "bad", LIMIT) is None
    assert await shared.fetch_crate(KEY, sha, tmp_path / "big", 10) is None
    assert await shared.usage() == (len(data), 1)


async def test_a_tampered_object_is_not_served(shared: SharedStorage, moto: MotoS3, tmp_path: Path) -> None:
    path, sha = crate_file(tmp_path, b"good")
    await shared.put_crate(KEY, path, sha)
    client = moto.client()
    (key,) = [o["Key"] for o in client.list_objects_v2(Bucket=moto.bucket)["Contents"]]
    client.put_object(Bucket=moto.bucket, Key=key, Body=b"evil", Metadata={"sha256": sha})
    assert await shared.fetch_crate(KEY, sha, tmp_path / "out", LIMIT) is None


async def test_redirect_url_serves_the_crate(shared: SharedStorage, tmp_path: Path) -> None:
    data = b"x" * 5000
    path, sha = crate_file(tmp_path, data)
    assert shared.redirects
    assert await shared.crate_url(KEY, sha) is None
    await shared.put_crate(KEY, path, sha)
    url = await shared.crate_url(KEY, sha)
    assert url is not None and "X-Amz-Signature=" in url and "X-Amz-Expires=300" in url
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert await response.read() == data


async def test_index_files_round_trip(shared: SharedStorage) -> None:
    crate = CrateName("Serde")
    assert await shared.get_index(crate) is None
    entry = IndexEntry(
        200, b'{"name":"serde"}\n', '"abc"', "Tue, 01 Dec 2026 00:00:00 GMT", time.time(), 'W/"u"'
    )
    await shared.put_index(crate, entry)
    assert await shared.get_index(CrateName("serde")) == entry
    await shared.put_index(CrateName("nope"), IndexEntry(404, b"", "", "", time.time()))
    assert await shared.get_index(CrateName("nope")) is None  # negative entries live in coordination


async def test_a_failing_store_is_reported_until_it_answers(shared: SharedStorage, moto: MotoS3) -> None:
    assert await shared.problem() is None
    assert await shared.get_index(CrateName("serde")) is None
    moto.stop()
    with pytest.raises(Exception, match=r"(?i)connect"):
        await shared.get_index(CrateName("serde"))
    problem = await shared.problem()
    assert problem is not None and problem.startswith("shared storage failing (")


async def test_each_registry_has_its_own_prefix(moto: MotoS3, tmp_path: Path) -> None:
    internal = make_shared_storage(storage_config(moto), LIMIT, registry="internal")
    await internal.start()
    try:
        path, sha = crate_file(tmp_path, b"internal crate")
        await internal.put_crate(KEY, path, sha)
    finally:
        await internal.close()
    assert moto.object_keys() == ["m/registries/internal/crates/Serde_json/1.0.0%2Bbuild.5.crate"]


async def test_an_object_authenticates_only_as_written_with_the_fleet_secret(
    shared: SharedStorage, moto: MotoS3, tmp_path: Path
) -> None:
    """Moved to another name, read with another key, or written without a MAC (an older version): absent,
    reported by kind; a fill then overwrites it despite If-None-Match."""
    client = moto.client()
    entry = IndexEntry(200, b'{"name":"serde"}\n', '"abc"', "Tue, 01 Dec 2026 00:00:00 GMT", time.time())
    await shared.put_index(CrateName("serde"), entry)
    assert await shared.get_index(CrateName("serde")) == entry
    client.copy_object(Bucket=moto.bucket, Key="m/index/rand", CopySource=f"{moto.bucket}/m/index/serde")
    failed: list[str] = []
    rotated = make_shared_storage(
        storage_config(moto, integrity_key="another-fleet-secret-0123456789abcdef"), LIMIT,
        on_integrity_failure=failed.append,
    )  # fmt: skip
    await rotated.start()
    try:
        assert await shared.get_index(CrateName("rand")) is None  # another name: its MAC does not verify
        assert await rotated.get_index(CrateName("serde")) is None
        assert failed == ["index"]

        data = b"crate bytes"
        path, sha = crate_file(tmp_path, data)
        client.put_object(Bucket=moto.bucket, Key="m/crates/Serde_json/1.0.0%2Bbuild.5.crate", Body=data,
                          Metadata={"sha256": sha})  # fmt: skip
        assert await rotated.fetch_crate(KEY, sha, tmp_path / "out", LIMIT) is None
        assert await rotated.crate_url(KEY, sha) is None
        assert failed == ["index", "crate", "crate"]
        await rotated.put_crate(KEY, path, sha)  # the fill's upload replaces the object
        assert await rotated.fetch_crate(KEY, sha, tmp_path / "out", LIMIT) == len(data)
        assert await shared.fetch_crate(KEY, sha, tmp_path / "out", LIMIT) is None  # the old key's view
    finally:
        await rotated.close()
