"""The storage seam's contract (ArtifactStore), written once and run against every backend: a cache dir
(DiskArtifacts over a real Store) and the bucket (S3Shared against moto's real S3 server). The operator
tools (verify, prune, export, import) rely on exactly this behaviour, whichever backend is configured."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cratemirror.cache.index import body_etag
from cratemirror.config.schema import StorageConfig
from cratemirror.fleet.storage import ArtifactStore, StoredCrate, VerifiedCrate, make_bucket_store
from cratemirror.fleet.storage.disk import IndexEntry, Store
from cratemirror.fleet.storage.disk_artifacts import DiskArtifacts
from cratemirror.names import CrateName, CrateVersion, parse_crate_version
from tests.fleet_support import MotoS3, set_stored_at

LIMIT = 1 << 20
BACKENDS = ["local", "s3"]


@dataclass
class Backend:
    """A store under test, and the test's own hands on what lies behind it (bytes changed or files
    dropped there by someone other than the mirror)."""

    name: str
    store: ArtifactStore
    overwrite: Callable[[CrateVersion, bytes], Awaitable[None]]  # new bytes, the record kept
    drop: Callable[[str, bytes], Awaitable[None]]  # something under crates/ the mirror never wrote
    age: Callable[[CrateVersion, float], Awaitable[None]]  # last used (a cache dir) or stored (a bucket) then


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "local":
        store = Store(tmp_path / "cache")

        async def overwrite_file(key: CrateVersion, data: bytes) -> None:
            store.crate_path(key.crate.name, key.version).write_bytes(data)

        async def drop_file(name: str, data: bytes) -> None:
            path = store.crates_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        async def age_row(key: CrateVersion, when: float) -> None:
            store.touch_crate(key.crate.name, key.version, when)

        try:
            yield Backend("local", DiskArtifacts(store), overwrite_file, drop_file, age_row)
        finally:
            store.close()
        return
    moto: MotoS3 = request.getfixturevalue("moto")
    config = StorageConfig.model_validate(
        {
            "backend": "s3",
            "s3": {
                "bucket": moto.bucket, "prefix": "m/", "endpoint_url": moto.endpoint, "region": "us-east-1",
                "access_key_id": moto.ACCESS_KEY, "secret_access_key": moto.SECRET_KEY,
                "integrity_key": moto.INTEGRITY_KEY,
            },
        }
    )  # fmt: skip
    shared = make_bucket_store(config, LIMIT)
    await shared.start()

    async def put_raw(key: str, data: bytes, metadata: dict[str, str]) -> None:
        await asyncio.to_thread(
            moto.client().put_object, Bucket=moto.bucket, Key=f"m/crates/{key}", Body=data, Metadata=metadata
        )

    async def overwrite_object(key: CrateVersion, data: bytes) -> None:
        name = f"{key.crate.name}/{key.version}.crate"
        head = await asyncio.to_thread(moto.client().head_object, Bucket=moto.bucket, Key=f"m/crates/{name}")
        await put_raw(name, data, head["Metadata"])  # the authentic record kept

    async def drop_object(name: str, data: bytes) -> None:
        await put_raw(name, data, {})

    async def age_object(key: CrateVersion, when: float) -> None:
        await asyncio.to_thread(set_stored_at, moto, f"m/crates/{key.crate.name}/{key.version}.crate", when)

    try:
        yield Backend("s3", shared, overwrite_object, drop_object, age_object)
    finally:
        await shared.close()


async def put(store: ArtifactStore, name: str, version: str, data: bytes) -> VerifiedCrate:
    """A crate as the tools put one: written to a temp file of the store's, hashed, then put."""
    temp = store.new_temp_file()
    temp.write_bytes(data)
    crate = VerifiedCrate(
        parse_crate_version(name, version), temp, hashlib.sha256(data).hexdigest(), len(data), time.time()
    )
    await store.put_crates([crate])
    return crate


async def listed(store: ArtifactStore, oldest_first: bool = False) -> list[StoredCrate]:
    return [item async for item in store.list_crates(oldest_first)]


async def test_a_put_crate_is_listed_stated_and_read_back(backend: Backend) -> None:
    store = backend.store
    data = b"crate bytes " * 100
    crate = await put(store, "Serde", "1.0.0+build.5", data)
    assert not crate.path.exists()  # the temp file is taken (moved into place, or uploaded and removed)

    [item] = await listed(store)
    assert (item.key, item.size) == (crate.key, len(data))
    record = await store.stat_crate(crate.key)
    assert record is not None and (record.sha256, record.present) == (crate.sha256, True)

    out = io.BytesIO()
    copy = await store.read_crate(crate.key, out, LIMIT)
    assert copy is not None and (copy.recorded, copy.sha256, copy.size, copy.too_large) == (
        crate.sha256, crate.sha256, len(data), False,
    )  # fmt: skip
    assert out.getvalue() == data
    assert await store.usage() == (len(data), 1)


async def test_a_crate_not_stored_is_none_everywhere(backend: Backend) -> None:
    missing = parse_crate_version("nothing", "0.1.0")
    assert await store_nothing(backend.store, missing)
    assert await listed(backend.store) == []
    assert await backend.store.usage() == (0, 0)


async def store_nothing(store: ArtifactStore, key: CrateVersion) -> bool:
    return await store.stat_crate(key) is None and await store.read_crate(key, None, LIMIT) is None


async def test_read_reports_what_the_bytes_hash_to_never_trusting_the_record(backend: Backend) -> None:
    crate = await put(backend.store, "rand", "0.8.5", b"good bytes " * 50)
    await backend.overwrite(crate.key, b"bad bytes " * 50)
    copy = await backend.store.read_crate(crate.key, None, LIMIT)
    assert copy is not None
    assert copy.recorded == crate.sha256 and copy.sha256 == hashlib.sha256(b"bad bytes " * 50).hexdigest()

    small = await backend.store.read_crate(crate.key, None, 10)  # stops past the limit
    assert small is not None and small.too_large


async def test_delete_removes_bytes_and_record(backend: Backend) -> None:
    kept = await put(backend.store, "kept", "1.0.0", b"k" * 300)
    gone = await put(backend.store, "gone", "1.0.0", b"g" * 200)
    assert await backend.store.delete_crates([gone.key]) == [gone.key]
    assert await store_nothing(backend.store, gone.key)
    assert [item.key for item in await listed(backend.store)] == [kept.key]
    assert await backend.store.usage() == (300, 1)


async def test_listing_groups_by_name_and_orders_by_recency(backend: Backend) -> None:
    crates = [("b", "1.0.0"), ("a", "2.0.0"), ("c", "1.0.0"), ("a", "1.0.0")]  # oldest first
    now = time.time()
    for age, (name, version) in enumerate(reversed(crates)):
        crate = await put(backend.store, name, version, f"{name}-{version}".encode())
        await backend.age(crate.key, now - 3600 * (age + 1))  # an hour apart, against name order
    by_name = [(item.key.crate.name, item.key.version) for item in await listed(backend.store)]
    assert sorted(by_name) == sorted(crates)
    names = [name for name, _ in by_name]
    assert names == sorted(names)  # each name's versions together, for export's one index file each
    oldest = await listed(backend.store, oldest_first=True)
    assert [(item.key.crate.name, item.key.version) for item in oldest] == crates
    assert [item.recency for item in oldest] == sorted(item.recency for item in oldest)
    async with backend.store.pruning():  # taken and given back
        pass


async def test_strays_are_listed_apart_and_removable(backend: Backend) -> None:
    crate = await put(backend.store, "real", "1.0.0", b"r" * 100)
    await backend.drop("junk/notes.crate", b"not a crate")
    [stray] = [stray async for stray in backend.store.list_strays()]
    assert stray.key is None and stray.name.endswith("junk/notes.crate")
    assert [item.key for item in await listed(backend.store)] == [crate.key]  # never listed as a crate
    assert await backend.store.delete_stray(stray)
    assert [stray async for stray in backend.store.list_strays()] == []
    assert [item.key for item in await listed(backend.store)] == [crate.key]


async def test_index_files_round_trip(backend: Backend) -> None:
    crate = CrateName("Serde")
    assert await backend.store.get_index(crate) is None
    body = b'{"name":"Serde","vers":"1.0.0"}\n'
    entry = IndexEntry(200, body, body_etag(body), "Tue, 01 Dec 2026 00:00:00 GMT", time.time())
    await backend.store.put_index(crate, entry)
    assert await backend.store.get_index(CrateName("serde")) == entry  # by the lowercase name
