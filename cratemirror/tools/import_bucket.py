"""`cratemirror import BUNDLE` with storage.backend s3: the bundle's verified crates and index files go
into the bucket every replica shares.

The importer's checks are unchanged (importer.py: each crate must hash to the manifest's sha256 AND to its
index line's cksum); only where it loads changes. BucketTarget is that destination: the importer runs in a
worker thread and each store call is a coroutine on this loop, so crates go up through
SharedStorage.put_crate (SHA-256 sent as the object checksum, If-None-Match: * keeps a copy already
there) and index files through put_index, unless the bucket holds one checked more recently.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tarfile
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from cratemirror.config.schema import Config
from cratemirror.fleet.storage import SharedStorage
from cratemirror.fleet.storage.disk import CrateMeta, IndexEntry, Store
from cratemirror.names import CrateName, parse_crate_version
from cratemirror.tools.common import bucket_failure, shared_storages
from cratemirror.tools.importer import Caps, ImportResult, import_bundle

T = TypeVar("T")
JOBS = 8  # uploads at once


class BucketTarget:
    """An ImportTarget on the bucket, called from the importer's worker thread."""

    def __init__(
        self, shared: SharedStorage, loop: asyncio.AbstractEventLoop, tmp_dir: Path, local: Store | None
    ) -> None:
        self.shared, self.loop, self.tmp_dir, self.local = shared, loop, tmp_dir, local

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()

    def get_crate_meta(self, name: str, version: str) -> CrateMeta | None:
        return None  # every verified crate is offered; put_crate's If-None-Match keeps a copy already there

    def crate_path(self, name: str, version: str) -> Path:
        raise AssertionError("not called: get_crate_meta is always None")

    def new_temp_file(self) -> Path:
        handle, name = tempfile.mkstemp(suffix=".part", dir=self.tmp_dir)
        os.close(handle)  # the importer opens it by name
        return Path(name)

    def commit_crates(self, batch: list[tuple[Path, CrateMeta]]) -> None:
        self._run(self._upload(batch))
        for temp, _ in batch:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    async def _upload(self, batch: list[tuple[Path, CrateMeta]]) -> None:
        for start in range(0, len(batch), JOBS):
            await asyncio.gather(
                *(
                    self.shared.put_crate(parse_crate_version(meta.name, meta.version), temp, meta.sha256)
                    for temp, meta in batch[start : start + JOBS]
                )
            )

    def get_index(self, lower_name: str) -> IndexEntry | None:
        return self._run(self.shared.get_index(CrateName(lower_name)))

    def put_index(self, lower_name: str, entry: IndexEntry) -> None:
        self._run(self.shared.put_index(CrateName(lower_name), entry))

    # Where tarballs live upstream (lets a replica start offline) stays in the local cache dir, as before.
    def get_json(self, key: str) -> Any:
        return self.local.get_json(key) if self.local is not None else None

    def put_json(self, key: str, value: Any) -> None:
        if self.local is not None:
            self.local.put_json(key, value)


async def _import(config: Config, bundle: Path, replace_advisory_db: bool) -> ImportResult:
    loop = asyncio.get_running_loop()
    local = Store(config.cache.dir)
    try:
        async with shared_storages(config) as storages:
            with tempfile.TemporaryDirectory(prefix=".import-", dir=config.cache.dir) as tmp:
                targets = {
                    name: BucketTarget(shared, loop, Path(tmp), None if name else local)
                    for name, shared in storages
                }
                main = targets.pop("")

                def work() -> ImportResult:
                    with tarfile.open(bundle, "r:*") as tar:
                        return import_bundle(
                            tar, main, config.policy.advisory_db, targets, caps=Caps.of(config),
                            replace_advisory_db=replace_advisory_db,
                        )  # fmt: skip

                return await asyncio.to_thread(work)
    finally:
        local.close()


def import_into_bucket(config: Config, bundle: Path, replace_advisory_db: bool = False) -> ImportResult:
    try:
        return asyncio.run(_import(config, bundle, replace_advisory_db))
    except (BotoCoreError, ClientError) as exc:
        raise OSError(bucket_failure(exc)) from None
