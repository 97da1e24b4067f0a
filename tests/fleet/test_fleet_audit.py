"""The audit trail of a fleet (moto's real S3 server): each replica uploads its records to the bucket
under audit/<replica>/, one `audit query` answers for every replica, from anywhere, and each replica's
advisory exposure gauge counts the clients of every replica."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from pathlib import Path

import aiohttp
import pytest

from cratemirror.fleet.storage.integrity import Sealer
from tests.fake_upstream import FakeRegistry
from tests.fleet_support import MotoS3, replicas
from tests.mirror_process import metric_value, wait_until
from tests.policy_support import LEAF_ADVISORY, write_advisory
from tests.tools_support import run_cli

pytestmark = pytest.mark.fleet

EXPOSURE = "cratemirror_advisory_exposure"


async def test_one_query_sees_both_replicas_records(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    registry.add_crate("alpha", "1.0.0")
    registry.add_crate("beta", "2.0.0")
    async with (
        replicas(registry.index_url, tmp_path, 2, config_text=moto.yaml()) as (a, b),
        aiohttp.ClientSession() as session,
    ):
        for mirror, name, version in ((a, "alpha", "1.0.0"), (b, "beta", "2.0.0")):
            async with session.get(f"{mirror.url}/api/v1/crates/{name}/{version}/download") as response:
                assert response.status == 200
        for mirror in (a, b):
            assert await mirror.stop() == 0, mirror.output()  # shutting down uploads the last records
    keys = [key for key in moto.object_keys() if key.startswith("audit/")]  # one object per replica and hour
    assert len(keys) == 2 and len({key.split("/")[1] for key in keys}) == 2, keys

    # Objects the replicas did not write are input like any other: skipped unless they authenticate with
    # the fleet secret, and then only their valid lines are taken.
    now = time.time()
    hour = int(now // 3600)
    good = {"at": now, "registry": "crates-io", "crate": "planted", "version": "1.0.0", "result": "served",
            "rule": "", "who": "x"}  # fmt: skip
    bad_lines = [
        json.dumps({**good, "crate": "../../etc"}), json.dumps({**good, "at": "soon"}),
        "not json", "[" * 5000,
        json.dumps({**good, "version": "2.0.0"}),  # the one valid line
    ]  # fmt: skip
    client = moto.client()
    sealer = Sealer(moto.INTEGRITY_KEY.encode())
    for key, body, sealed in (
        # Written with the fleet secret (a replica gone wrong): only its valid line is taken.
        (f"audit/intruder/{hour:010d}.jsonl.gz", gzip.compress("\n".join(bad_lines).encode()), True),
        (f"audit/garbage/{hour:010d}.jsonl.gz", b"not gzip at all", True),
        # Without the secret (anyone who can write the bucket): not taken at all.
        (f"audit/forger/{hour:010d}.jsonl.gz", gzip.compress(json.dumps(good).encode()), False),
        (f"audit/Bad_Name/{hour:010d}.jsonl.gz", gzip.compress(json.dumps(good).encode()), True),
        (f"audit/intruder/{hour:010d}.txt", gzip.compress(json.dumps(good).encode()), True),
    ):
        meta = sealer.seal("audit", key, hashlib.sha256(body).hexdigest(), {}) if sealed else {}
        client.put_object(Bucket=moto.bucket, Key=key, Body=body, Metadata=meta)

    config = tmp_path / "mirror.yaml"
    elsewhere = tmp_path / "elsewhere"  # no cache dir there: every record comes from the bucket
    elsewhere.mkdir()
    # Replica 0's own cache dir: its records from its file, the other replica's from the bucket.
    own = tmp_path / "own.yaml"
    own.write_text(config.read_text() + f"cache:\n  dir: {tmp_path / 'replica0' / 'cache'}\n")
    for cwd, config_file in ((elsewhere, config), (tmp_path, own)):
        result = await run_cli("audit", "query", "--format", "json", "--config", str(config_file), cwd=cwd)
        assert result.code == 0, result.output
        rows = json.loads(result.stdout)
        assert sorted((row["crate"], row["version"], row["result"]) for row in rows) == [
            ("alpha", "1.0.0", "served"), ("beta", "2.0.0", "served"), ("planted", "2.0.0", "served"),
        ]  # fmt: skip


async def test_the_exposure_gauge_counts_the_clients_of_every_replica(
    registry: FakeRegistry, moto: MotoS3, tmp_path: Path
) -> None:
    """Replica A served an affected version; the advisory lands while only replica B runs: B's gauge,
    status page and warning count A's client (from A's audit objects in the bucket)."""
    db = tmp_path / "advisory-db"
    (db / "crates").mkdir(parents=True)  # a checkout without an advisory yet
    registry.add_crate("leaf", "0.3.0")
    registry.add_crate("other", "1.0.0")
    config = moto.yaml() + f"policy:\n  advisory_db: {db}\n"
    async with (
        replicas(registry.index_url, tmp_path, 2, config_text=config) as (a, b),
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"{a.url}/api/v1/crates/leaf/0.3.0/download") as response:
            assert response.status == 200
        async with session.get(f"{b.url}/api/v1/crates/other/1.0.0/download") as response:
            assert response.status == 200  # B's own records: none affected
        assert await a.stop() == 0, a.output()  # shutting down uploads A's records
        write_advisory(db, "leaf", LEAF_ADVISORY, patched=[">= 0.3.1"])

        async def exposed() -> bool:
            async with session.get(f"{b.url}/metrics") as response:
                text = await response.text()
            try:
                return metric_value(text, EXPOSURE, advisory=LEAF_ADVISORY) == 1
            except KeyError:  # not set yet
                return False

        await wait_until(exposed, f"{EXPOSURE} on B for {LEAF_ADVISORY}", timeout=20, interval=0.2)
        async with session.get(f"{b.url}/") as response:
            page = await response.text()
        assert 'id="advisory-exposure"' in page and LEAF_ADVISORY in page
        warning = (
            f"advisory {LEAF_ADVISORY} affects versions this mirror already served to 1 client (127.0.0.1)"
        )
        assert b.output().count(warning) == 1, b.output()
