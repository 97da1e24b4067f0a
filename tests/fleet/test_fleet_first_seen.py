"""The release-age cooldown of a fleet (moto's real S3 server, real mirror processes): a line without a
pubtime is timed from the first time any replica saw it, through the authenticated `first-seen/<crate>`
objects in the bucket, and an object that does not authenticate is ignored, counted and rewritten."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from pathlib import Path

import aiohttp
import pytest

from cratemirror.cache.index import body_etag
from cratemirror.config.schema import S3Config
from cratemirror.fleet.storage.disk import IndexEntry, Store
from cratemirror.fleet.storage.integrity import Sealer
from cratemirror.fleet.storage.s3 import S3Shared
from cratemirror.policy.advisories import AdvisoryDb
from cratemirror.policy.cooldown import Cooldown
from tests.fake_upstream import FakeRegistry
from tests.fleet_support import MotoS3, replicas
from tests.mirror_process import MirrorProcess, free_port, metric_value, wait_until

pytestmark = pytest.mark.fleet

COOLDOWN = 6.0  # seconds: long enough for the checks after a line appears, short enough to wait out
POLICY = (
    "cache:\n  index_ttl: 0\n  stale_while_revalidate: 0\n"  # every request sees upstream's current file
    f"policy:\n  mode: enforce\n  min_release_age: {COOLDOWN:g}s\n"
)
FAILURES = "cratemirror_storage_integrity_failures_total"


async def view(session: aiohttp.ClientSession, mirror: MirrorProcess, name: str) -> dict[str, bool]:
    """version -> yanked, in the index file the replica serves (held-back versions are yanked)."""
    async with session.get(f"{mirror.url}/index/{name[:2]}/{name[2:4]}/{name}") as response:
        assert response.status == 200, await response.text()
        body = await response.read()
    return {line["vers"]: line["yanked"] for line in map(json.loads, body.splitlines())}


async def download(session: aiohttp.ClientSession, mirror: MirrorProcess, name: str, version: str) -> int:
    async with session.get(f"{mirror.url}/api/v1/crates/{name}/{version}/download") as response:
        await response.read()
        return response.status


def first_seen_object(moto: MotoS3, name: str) -> tuple[dict[str, float], bool]:
    """The bucket's first-seen times of a crate, and whether the object authenticates."""
    key = f"first-seen/{name}"
    answer = moto.client().get_object(Bucket=moto.bucket, Key=key)
    body = answer["Body"].read()
    problem = Sealer(moto.INTEGRITY_KEY.encode()).problem(
        "first-seen", key, hashlib.sha256(body).hexdigest(), answer["Metadata"]
    )
    return json.loads(body)["seen"], problem is None


def plant(moto: MotoS3, key: str, body: bytes, metadata: dict[str, str]) -> None:
    moto.client().put_object(Bucket=moto.bucket, Key=key, Body=body, Metadata=metadata)


async def test_a_line_is_timed_from_the_first_replica_that_saw_it(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    registry.add_crate("plain", "1.0.0")  # no pubtime: in the first copy the fleet sees, the baseline
    async with (
        replicas(registry.index_url, tmp_path, 3, config_text=moto.yaml() + POLICY) as (a, b, c),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        assert await view(session, a, "plain") == {"1.0.0": False}
        assert await view(session, b, "plain") == {"1.0.0": False}

        registry.add_crate("plain", "1.1.0")  # no pubtime: replica A sees it first, and holds it back
        before = time.time()
        assert await view(session, a, "plain") == {"1.0.0": False, "1.1.0": True}
        after = time.time()

        async def aged() -> bool:
            return await view(session, a, "plain") == {"1.0.0": False, "1.1.0": False}

        await wait_until(aged, f"1.1.0 to pass its {COOLDOWN:g} s cooldown on A", timeout=30, interval=0.2)

        registry.add_crate("plain", "1.2.0")  # truly new
        # B sees 1.1.0 for the first time now, hours (here: seconds) after A did: A's time, which passed.
        # 1.2.0 nobody saw before: held back.
        assert await view(session, b, "plain") == {"1.0.0": False, "1.1.0": False, "1.2.0": True}
        assert await download(session, b, "plain", "1.1.0") == 200
        assert await download(session, b, "plain", "1.2.0") == 403
        # C never saw the crate: its first copy is no baseline, since the fleet has seen the crate.
        assert await view(session, c, "plain") == {"1.0.0": False, "1.1.0": False, "1.2.0": True}
        assert await download(session, c, "plain", "1.2.0") == 403
        assert await view(session, a, "plain") == {"1.0.0": False, "1.1.0": False, "1.2.0": True}
        assert await download(session, a, "plain", "1.2.0") == 403
        # The fleet's times, in the bucket: the baseline, A's sighting of 1.1.0 and B's of 1.2.0.
        seen, authentic = await asyncio.to_thread(first_seen_object, moto, "plain")
        assert authentic and sorted(seen) == ["1.0.0", "1.1.0", "1.2.0"]
        assert seen["1.0.0"] == 0 and before - 1 <= seen["1.1.0"] <= after < seen["1.2.0"]
        for mirror in (a, b, c):
            async with session.get(f"{mirror.url}/metrics") as response:
                assert metric_value(await response.text(), FAILURES, kind="first-seen") == 0


async def test_a_first_seen_object_that_does_not_authenticate_is_ignored(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    registry.add_crate("forged", "1.0.0")
    async with (
        replicas(registry.index_url, tmp_path, 2, config_text=moto.yaml() + POLICY) as (a, b),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        assert await view(session, a, "forged") == {"1.0.0": False}
        assert await view(session, b, "forged") == {"1.0.0": False}
        registry.add_crate("forged", "1.1.0")
        # Someone with the bucket's credentials but not the fleet secret says 1.1.0 is old: first without
        # a MAC, then with one made by another key.
        body = json.dumps({"v": 1, "seen": {"1.0.0": 0, "1.1.0": 0}}).encode()
        other = Sealer(b"not the fleet's integrity key, but as long")
        for mirror, sealer in ((a, None), (b, other)):
            digest = hashlib.sha256(body).hexdigest()
            meta = sealer.seal("first-seen", "first-seen/forged", digest, {}) if sealer is not None else {}
            await asyncio.to_thread(plant, moto, "first-seen/forged", body, meta)
            # Ignored: 1.1.0 is new to the replica, so it is held back; the failure counted and logged.
            assert await view(session, mirror, "forged") == {"1.0.0": False, "1.1.0": True}
            assert await download(session, mirror, "forged", "1.1.0") == 403
            async with session.get(f"{mirror.url}/metrics") as response:
                assert metric_value(await response.text(), FAILURES, kind="first-seen") == 1
            assert "shared storage: first-seen/forged has" in mirror.output()
            # ... and the object rewritten with the replica's own times, authentic again.
            seen, authentic = await asyncio.to_thread(first_seen_object, moto, "forged")
            assert authentic and seen["1.0.0"] == 0 and seen["1.1.0"] > 0


def bucket(moto: MotoS3, reachable: bool = True) -> S3Shared:
    """A replica's view of the fleet's bucket; `reachable=False`: the same config on a port nobody
    listens on (the bucket down, as a replica sees it)."""
    config = S3Config(
        bucket=moto.bucket, endpoint_url=moto.endpoint if reachable else f"http://127.0.0.1:{free_port()}",
        region="us-east-1", access_key_id=moto.ACCESS_KEY, secret_access_key=moto.SECRET_KEY,
        integrity_key=moto.INTEGRITY_KEY, timeout=2.0,
    )  # fmt: skip
    return S3Shared(config, 1 << 20)


def copy(registry: FakeRegistry, name: str) -> IndexEntry:
    body = registry.index_file(name)
    return IndexEntry(200, body, body_etag(body), "Tue, 01 Dec 2026 00:00:00 GMT", time.time())


async def test_a_baseline_never_makes_old_a_line_a_replica_saw_appear(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    """Replica C sees a crate for the first time while the bucket is down: its copy is its baseline
    (nothing is held back for want of the bucket), but once the bucket answers, a line the fleet saw
    as new is timed from the fleet's sighting, and C's baseline never makes it old in the bucket. The
    same when the object was deleted: a new replica's baseline does not lower A's sighting."""
    db = AdvisoryDb()
    registry.add_crate("late", "1.0.0")
    async with contextlib.AsyncExitStack() as stack:
        shared_a, down, shared_c = bucket(moto), bucket(moto, reachable=False), bucket(moto)
        for shared in (shared_a, down, shared_c):
            await shared.start()
            stack.push_async_callback(shared.close)
        store_a, store_c = Store(tmp_path / "a"), Store(tmp_path / "c")
        stack.callback(store_a.close)
        stack.callback(store_c.close)
        a = Cooldown(store_a, 3600.0, True, shared_a)
        assert (await a.learn("late", copy(registry, "late"), db)).releases == {"1.0.0": (0.0, False)}
        registry.add_crate("late", "1.1.0")
        seen_by_a = (await a.learn("late", copy(registry, "late"), db)).releases["1.1.0"][0]
        assert seen_by_a > 0 and a.hold("late", "1.1.0") is not None

        c = Cooldown(store_c, 3600.0, True, down)
        learned = await c.learn("late", copy(registry, "late"), db)
        assert learned.releases == {"1.0.0": (0.0, False), "1.1.0": (0.0, False)}
        assert learned.retry_at <= time.time() + 60  # the view is learned again soon
        c = Cooldown(store_c, 3600.0, True, shared_c)  # the bucket answers again
        learned = await c.learn("late", copy(registry, "late"), db)
        assert learned.releases == {"1.0.0": (0.0, False), "1.1.0": (seen_by_a, False)}
        assert c.hold("late", "1.1.0") is not None
        seen, authentic = await asyncio.to_thread(first_seen_object, moto, "late")
        assert authentic and seen == {"1.0.0": 0, "1.1.0": seen_by_a}

        # Someone deletes the object; replica D, new, takes its first copy as the baseline ...
        await asyncio.to_thread(moto.client().delete_object, Bucket=moto.bucket, Key="first-seen/late")
        store_d = Store(tmp_path / "d")
        stack.callback(store_d.close)
        d = Cooldown(store_d, 3600.0, True, shared_c)
        assert (await d.learn("late", copy(registry, "late"), db)).releases["1.1.0"] == (0.0, False)
        assert (await asyncio.to_thread(first_seen_object, moto, "late"))[0]["1.1.0"] == 0
        # ... which A's next copy does not take: A's sighting stands, and goes back into the bucket.
        registry.add_crate("late", "1.2.0")
        learned = await a.learn("late", copy(registry, "late"), db)
        assert learned.releases["1.1.0"] == (seen_by_a, False) and learned.releases["1.2.0"][0] > seen_by_a
        seen, authentic = await asyncio.to_thread(first_seen_object, moto, "late")
        assert authentic and seen["1.1.0"] == seen_by_a
        assert (await d.learn("late", copy(registry, "late"), db)).releases["1.1.0"] == (seen_by_a, False)
