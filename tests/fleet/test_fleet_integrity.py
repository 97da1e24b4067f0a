"""An authenticated bucket (issue #18, finding 1): whoever can write the bucket but does not hold the
fleet secret (storage.s3.integrity_key) cannot make a replica serve anything upstream did not. Objects
are rewritten through boto3 behind real mirror processes (moto's real S3 server on loopback)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cratemirror.cache.index import body_etag
from cratemirror.config.schema import S3Config
from cratemirror.fleet.storage.disk import IndexEntry
from cratemirror.fleet.storage.integrity import Sealer
from cratemirror.fleet.storage.s3 import S3Shared
from cratemirror.names import parse_name
from tests.fake_upstream import FakeRegistry
from tests.fleet_support import MotoS3, replicas
from tests.mirror_process import MirrorProcess, metric_value, wait_until
from tests.tools_support import run_cli

FAILURES = "cratemirror_storage_integrity_failures_total"
# Quick to give up on an upstream that is down; nothing else differs from a deployment.
UPSTREAM = "upstream:\n  retries: 0\n  timeout: 5s\n"
CRATE_KEY = "crates/serde/1.0.0.crate"
UPSTREAM_DOWNLOAD = "/crates/serde/1.0.0/download"  # the fake upstream's path for it
INDEX_KEY = "index/serde"
TEN_YEARS = 10 * 365 * 86400.0


def test_a_mac_covers_kind_key_body_and_every_validator() -> None:
    """The record format itself: any field changed, the kind swapped, or bytes moved from one field to
    the next (length-prefixed), and the MAC no longer verifies; another secret says so."""
    sealer = Sealer(b"k" * 40)
    meta = {
        "etag": '"e"',
        "last-modified": "lm",
        "checked-at": "1.5",
        "upstream-etag": "u",
        "upstream-last-modified": "",
    }
    sealed = sealer.seal("index", "index/serde", "ab" * 32, meta)
    assert sealer.problem("index", "index/serde", "ab" * 32, sealed) is None
    assert sealer.problem("crate", "index/serde", "ab" * 32, sealed) is not None
    assert sealer.problem("index", "index/serd", "ab" * 32, sealed) is not None
    assert sealer.problem("index", "index/serde", "cd" * 32, sealed) is not None
    for field in meta:
        assert sealer.problem("index", "index/serde", "ab" * 32, {**sealed, field: "x"}) is not None, field
    moved = {**sealed, "etag": '"e"l', "last-modified": "m"}
    assert sealer.problem("index", "index/serde", "ab" * 32, moved) is not None
    assert sealer.problem("index", "index/serde", "ab" * 32, meta) == (
        "no MAC (written by an older version, or not by a replica)"
    )
    other = Sealer(b"o" * 40)
    assert other.problem("index", "index/serde", "ab" * 32, sealed) == (
        "a MAC made with another integrity_key (rotated?)"
    )
    assert sealed["mac"].startswith("v1:") and str(b"k" * 40) not in str(sealed)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with session.get(url, allow_redirects=False) as response:
        return response.status, response.headers.get("X-Cache", ""), await response.read()


async def failures(session: aiohttp.ClientSession, mirror: MirrorProcess, kind: str) -> float:
    async with session.get(f"{mirror.url}/metrics") as response:
        return metric_value(await response.text(), FAILURES, kind=kind)


def read_object(moto: MotoS3, key: str) -> tuple[bytes, dict[str, str]]:
    answer = moto.client().get_object(Bucket=moto.bucket, Key=key)
    return answer["Body"].read(), dict(answer["Metadata"])


def write_object(moto: MotoS3, key: str, body: bytes, metadata: dict[str, str]) -> None:
    moto.client().put_object(Bucket=moto.bucket, Key=key, Body=body, Metadata=metadata)


async def in_bucket(moto: MotoS3, key: str, body: bytes, what: str) -> None:
    async def there() -> bool:
        keys = await asyncio.to_thread(moto.object_keys)
        return key in keys and (await asyncio.to_thread(read_object, moto, key))[0] == body

    await wait_until(there, what, timeout=20, interval=0.05)


@pytest.mark.parametrize("checked_at", ["far-future", "honest"])
async def test_a_rewritten_index_and_a_planted_crate_are_never_served(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path, checked_at: str
) -> None:
    """The attack of the issue: the index object's cksum changed and a matching crate planted. A far-future
    checked-at used to pin it; an honest one kept the stored upstream ETag, so revalidation said 304."""
    true = registry.add_crate("serde", "1.0.0")
    evil = b"evil crate bytes: not what upstream published"
    evil_sha = hashlib.sha256(evil).hexdigest()
    async with (
        replicas(registry.index_url, tmp_path, 3, config_text=moto.yaml() + UPSTREAM) as (a, b, c),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        download = "/api/v1/crates/serde/1.0.0/download"
        assert await get(session, f"{a.url}{download}") == (200, "MISS", true.data)
        await in_bucket(moto, CRATE_KEY, true.data, "replica A to store serde 1.0.0")

        # The attacker holds bucket credentials, not the fleet secret.
        body, meta = await asyncio.to_thread(read_object, moto, INDEX_KEY)
        planted = body.replace(true.cksum.encode(), evil_sha.encode())
        assert planted != body
        meta["checked-at"] = repr(time.time() + TEN_YEARS if checked_at == "far-future" else time.time())
        meta["etag"] = body_etag(planted)
        await asyncio.to_thread(write_object, moto, INDEX_KEY, planted, meta)
        crate_meta = (await asyncio.to_thread(read_object, moto, CRATE_KEY))[1]
        await asyncio.to_thread(write_object, moto, CRATE_KEY, evil, {**crate_meta, "sha256": evil_sha})

        # Replica B never saw serde: it serves upstream's index file and crate, never the planted ones.
        registry.reset_counts()
        status, _, index_body = await get(session, f"{b.url}/index/se/rd/serde")
        assert (status, index_body) == (200, registry.index_file("serde"))
        assert await get(session, f"{b.url}{download}") == (200, "MISS", true.data)
        assert registry.count("/index/se/rd/serde") == 1 and registry.count(UPSTREAM_DOWNLOAD) == 1
        assert await failures(session, b, "index") == 1
        assert await failures(session, b, "crate") == 1
        assert b.output().count(f"shared storage: {CRATE_KEY} has") == 1, b.output()

        # ... and puts right what it read: both objects now hold upstream's bytes again.
        await in_bucket(moto, INDEX_KEY, registry.index_file("serde"), "the index object replaced")
        await in_bucket(moto, CRATE_KEY, true.data, "the crate object replaced")

        # The good path afterwards: replica C takes both from the bucket without asking upstream.
        registry.reset_counts()
        status, _, index_body = await get(session, f"{c.url}/index/se/rd/serde")
        assert (status, index_body) == (200, registry.index_file("serde"))
        assert await get(session, f"{c.url}{download}") == (200, "HIT", true.data)
        assert registry.requests.total() == 0, dict(registry.requests)
        assert await failures(session, c, "index") == 0 and await failures(session, c, "crate") == 0


async def test_a_rewritten_crate_body_is_never_served_and_is_replaced(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    """The crate's authentic record kept, its bytes changed: the bytes no longer hash to the record."""
    true = registry.add_crate("serde", "1.0.0")
    async with (
        replicas(registry.index_url, tmp_path, 2, config_text=moto.yaml() + UPSTREAM) as (a, b),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        download = "/api/v1/crates/serde/1.0.0/download"
        assert await get(session, f"{a.url}{download}") == (200, "MISS", true.data)
        await in_bucket(moto, CRATE_KEY, true.data, "replica A to store serde 1.0.0")
        _, meta = await asyncio.to_thread(read_object, moto, CRATE_KEY)
        bad = true.data[:40] + bytes([true.data[40] ^ 0xFF]) + true.data[41:]
        await asyncio.to_thread(write_object, moto, CRATE_KEY, bad, meta)

        # Upstream down: B has the (authentic) index file from the bucket but no good crate anywhere.
        registry.down = True
        for _ in range(3):
            try:
                status, _, body = await get(session, f"{b.url}{download}")
            except aiohttp.ClientPayloadError:
                continue  # a cut connection is an answer too: never the bad bytes
            assert status >= 500 and body != bad, (status, body[:200])
        assert await failures(session, b, "crate") == 3
        assert b.output().count(f"shared storage: {CRATE_KEY} has") == 1, b.output()  # once per key

        # Upstream back (B's circuit breaker retries it within a second): the true bytes, the bad object
        # replaced.
        registry.down = False
        answers: list[tuple[int, str, bytes]] = []

        async def served() -> bool:
            answers.append(await get(session, f"{b.url}{download}"))
            return answers[-1][0] == 200

        await wait_until(served, "B to serve serde 1.0.0 again", timeout=20, interval=0.2)
        assert answers[-1] == (200, "MISS", true.data)
        assert all(status >= 500 for status, _, _ in answers[:-1]), answers
        await in_bucket(moto, CRATE_KEY, true.data, "the crate object replaced")
        assert await get(session, f"{b.url}{download}") == (200, "HIT", true.data)
        # Each read of the bad object counted (every answer above read it first); none since it was replaced.
        assert await failures(session, b, "crate") == 3 + len(answers)


async def test_redirect_mode_hands_out_no_url_for_a_tampered_record(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    true = registry.add_crate("serde", "1.0.0")
    evil = b"evil crate bytes"
    text = moto.yaml(serve="redirect") + UPSTREAM
    async with (
        replicas(registry.index_url, tmp_path, 2, config_text=text) as (a, b),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        download = "/api/v1/crates/serde/1.0.0/download"
        assert await get(session, f"{a.url}{download}") == (200, "MISS", true.data)
        await in_bucket(moto, CRATE_KEY, true.data, "replica A to store serde 1.0.0")
        # A record naming the index's cksum, over other bytes, not made with the fleet secret.
        await asyncio.to_thread(write_object, moto, CRATE_KEY, evil, {"sha256": true.cksum})

        # B would redirect to an object it trusts; this one it does not: it serves upstream's bytes.
        registry.reset_counts()
        assert await get(session, f"{b.url}{download}") == (200, "MISS", true.data)
        assert registry.count(UPSTREAM_DOWNLOAD) == 1
        assert await failures(session, b, "crate") >= 1
        await in_bucket(moto, CRATE_KEY, true.data, "the crate object replaced")

        # The good path afterwards: a redirect to the replaced object, which holds the true bytes.
        async with session.get(f"{b.url}{download}", allow_redirects=False) as response:
            assert response.status == 302
            location = response.headers["Location"]
        async with session.get(location) as response:
            assert response.status == 200 and await response.read() == true.data


def fleet_replica_storage(moto: MotoS3) -> S3Shared:
    """What another replica of the fleet writes with (it holds the secret)."""
    config = S3Config(
        bucket=moto.bucket, endpoint_url=moto.endpoint, region="us-east-1",
        access_key_id=moto.ACCESS_KEY, secret_access_key=moto.SECRET_KEY, integrity_key=moto.INTEGRITY_KEY,
    )  # fmt: skip
    return S3Shared(config, 1 << 20)


async def put_index(moto: MotoS3, name: str, body: bytes, checked_at: float) -> None:
    shared = fleet_replica_storage(moto)
    await shared.start()
    try:
        entry = IndexEntry(200, body, body_etag(body), "Tue, 01 Dec 2026 00:00:00 GMT", checked_at)
        await shared.put_index(parse_name(name), entry)
    finally:
        await shared.close()


def versions(body: bytes) -> list[str]:
    return [json.loads(line)["vers"] for line in body.splitlines()]


async def test_refresh_always_reaches_upstream_and_no_copy_checked_in_the_future_is_taken(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    """Authentic copies, written by a replica whose clock runs ahead: a few seconds (within the skew a
    fleet tolerates) and a day (not taken). `refresh` never answers from the bucket."""
    registry.add_crate("serde", "1.0.0")
    registry.add_crate("rand", "0.8.5")
    old_serde, old_rand = registry.index_file("serde"), registry.index_file("rand")
    await put_index(moto, "serde", old_serde, time.time() + 5)
    await put_index(moto, "rand", old_rand, time.time() + 86400)
    registry.add_crate("serde", "1.0.1")  # published after the copies were written
    registry.add_crate("rand", "0.8.6")
    async with (
        replicas(registry.index_url, tmp_path, 1, config_text=moto.yaml() + UPSTREAM) as (mirror,),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        # `refresh` asks upstream even though the bucket's copy says it was checked after the request.
        async with session.post(f"{mirror.url}/-/refresh/serde") as response:
            assert response.status == 200, await response.text()
            answer: dict[str, Any] = await response.json()
        assert answer["found"] is True
        assert registry.count("/index/se/rd/serde") == 1
        status, _, body = await get(session, f"{mirror.url}/index/se/rd/serde")
        assert status == 200 and versions(body) == ["1.0.0", "1.0.1"]
        # A day ahead: not trusted as fresh, so upstream is asked and the new version is there.
        status, _, body = await get(session, f"{mirror.url}/index/ra/nd/rand")
        assert status == 200 and versions(body) == ["0.8.5", "0.8.6"]
        assert registry.count("/index/ra/nd/rand") == 1
        assert await failures(session, mirror, "index") == 0  # authentic, just not taken


async def test_s3_without_an_integrity_key_refuses_to_start(moto: MotoS3, tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    lines = [line for line in moto.yaml().splitlines() if "integrity_key" not in line]
    config.write_text("\n".join(lines) + "\n")
    result = await run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert f"{config}: storage.s3.integrity_key: expected a secret shared by the replicas" in line
    assert "python3 -c 'import secrets; print(secrets.token_hex(32))'" in line
    assert moto.object_keys() == []
