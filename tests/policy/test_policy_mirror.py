"""The policy at the mirror's door (in-process mirror, real fake upstream on loopback): the index view,
the 403 for a blocked download, licences read from the fetched crate, report mode, metrics, audit log
and the status page."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cratemirror.cache.index import body_etag
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry
from tests.mirror_process import metric_value
from tests.policy_support import LEAF_ADVISORY, LICENCES, publish_policy_tree, synthetic_db

Client = TestClient[Any, Any]
DECISIONS = "cratemirror_policy_decisions_total"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return synthetic_db(tmp_path / "advisory-db")


async def _metrics(mirror: Client) -> str:
    response = await mirror.get("/metrics")
    return await response.text()


def _lines(body: bytes) -> dict[str, dict[str, Any]]:
    return {record["vers"]: record for record in map(json.loads, body.splitlines())}


async def test_enforce_yanks_in_the_index_and_refuses_the_download(
    registry: FakeRegistry, mirror_factory: MirrorFactory, db: Path
) -> None:
    publish_policy_tree(registry)
    mirror = await mirror_factory(policy__mode="enforce", policy__advisory_db=db)
    upstream = registry.index_file("leaf")

    response = await mirror.get("/index/le/af/leaf")
    assert response.status == 200
    body = await response.read()
    assert {vers: line["yanked"] for vers, line in _lines(body).items()} == {
        "0.2.9": False, "0.3.0": True, "0.3.1": False, "0.3.2": True,
    }  # fmt: skip
    changed = [
        (old, new) for old, new in zip(upstream.split(b"\n"), body.split(b"\n"), strict=True) if old != new
    ]
    assert len(changed) == 2
    assert all(new == old.replace(b'"yanked":false', b'"yanked":true') for old, new in changed)
    # The ETag is the view's own, and a client holding the upstream's copy gets the new view.
    assert response.headers["ETag"] == body_etag(body) != body_etag(upstream)
    again = await mirror.get("/index/le/af/leaf", headers={"If-None-Match": body_etag(upstream)})
    assert again.status == 200
    same = await mirror.get("/index/le/af/leaf", headers={"If-None-Match": body_etag(body)})
    assert same.status == 304
    # A crate no rule names is the upstream's, byte for byte.
    top = await mirror.get("/index/3/t/top")
    assert await top.read() == registry.index_file("top")
    assert top.headers["ETag"] == body_etag(registry.index_file("top"))

    blocked = await mirror.get("/api/v1/crates/leaf/0.3.2/download")
    assert blocked.status == 403
    assert blocked.headers["X-Cratemirror-Policy"] == LEAF_ADVISORY
    text = await blocked.text()
    assert text.count("\n") == 1 and LEAF_ADVISORY in text and "=0.3.1" in text
    assert registry.count("/leaf/0.3.2/download") == 0  # decided from name and version: never fetched
    fine = await mirror.get("/api/v1/crates/leaf/0.3.1/download")
    assert fine.status == 200
    assert await fine.read() == registry.get_version("leaf", "0.3.1").data

    metrics = await _metrics(mirror)
    assert metric_value(metrics, DECISIONS, action="block", rule=LEAF_ADVISORY) == 1
    assert metric_value(metrics, DECISIONS) == 1
    page = await (await mirror.get("/")).text()
    assert 'id="policy-mode" data-value="enforce"' in page
    assert 'id="policy-advisories" data-value="3"' in page and "2099-01-02" in page
    assert LEAF_ADVISORY in page.split('id="policy-decisions"', 1)[1]


async def test_licences_are_read_from_the_fetched_crate(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    publish_policy_tree(registry)
    mirror = await mirror_factory(policy__mode="enforce", policy__licenses=LICENCES)
    gpl = registry.get_version("gplonly", "1.0.0")

    # Before the crate was ever fetched its licence is unknown: the index shows it as upstream does.
    index = await mirror.get("/index/gp/lo/gplonly")
    assert await index.read() == registry.index_file("gplonly")

    refused = await mirror.get("/api/v1/crates/gplonly/1.0.0/download")
    assert refused.status == 403
    assert refused.headers["X-Cratemirror-Policy"] == "license"
    reason = await refused.text()
    assert "'GPL-3.0-only' is not satisfied by the allowed licences (MIT, Apache-2.0)" in reason
    assert "gplonly@=1.0.0" in reason  # the allow entry to ask for
    # Fetched and verified once; the licence is remembered: no second upstream fetch, same answer.
    again = await mirror.get("/api/v1/crates/gplonly/1.0.0/download")
    assert again.status == 403 and again.headers["X-Cache"] == "HIT"
    assert registry.count("/gplonly/1.0.0/download") == 1
    # Now known, the version is yanked in the index view.
    index = await mirror.get("/index/gp/lo/gplonly")
    assert _lines(await index.read())["1.0.0"]["yanked"] is True
    assert gpl.data  # the upstream bytes stay in the cache untouched
    dual = await mirror.get("/api/v1/crates/dual/1.0.0/download")
    assert dual.status == 200
    assert hashlib.sha256(await dual.read()).hexdigest() == registry.get_version("dual", "1.0.0").cksum
    metrics = await _metrics(mirror)
    assert metric_value(metrics, DECISIONS, action="block", rule="license") == 2


async def test_a_crate_cached_before_the_policy_is_checked_when_served(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    publish_policy_tree(registry)
    before = await mirror_factory(cache_dir=tmp_path / "cache")
    assert (await before.get("/api/v1/crates/gplonly/1.0.0/download")).status == 200
    after = await mirror_factory(
        cache_dir=tmp_path / "cache", policy__mode="enforce", policy__licenses=LICENCES
    )
    refused = await after.get("/api/v1/crates/gplonly/1.0.0/download")
    assert refused.status == 403 and refused.headers["X-Cratemirror-Policy"] == "license"
    assert registry.count("/gplonly/1.0.0/download") == 1


async def test_report_mode_blocks_nothing_and_counts(
    registry: FakeRegistry, mirror_factory: MirrorFactory, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cratemirror.policy")
    publish_policy_tree(registry)
    mirror = await mirror_factory(policy__mode="report", policy__advisory_db=db, policy__licenses=LICENCES)
    index = await mirror.get("/index/le/af/leaf")
    assert await index.read() == registry.index_file("leaf")
    assert index.headers["ETag"] == body_etag(registry.index_file("leaf"))
    for name, version in (("leaf", "0.3.2"), ("gplonly", "1.0.0"), ("leaf", "0.3.1")):
        response = await mirror.get(f"/api/v1/crates/{name}/{version}/download")
        assert response.status == 200, await response.text()
        assert "X-Cratemirror-Policy" not in response.headers
        assert await response.read() == registry.get_version(name, version).data
    metrics = await _metrics(mirror)
    assert metric_value(metrics, DECISIONS, action="warn", rule=LEAF_ADVISORY) == 1
    assert metric_value(metrics, DECISIONS, action="warn", rule="license") == 1
    assert metric_value(metrics, DECISIONS, action="block") == 0
    audit = [record.getMessage() for record in caplog.records if record.name == "cratemirror.policy"]
    audit = [line for line in audit if line.startswith("policy ")]
    assert len(audit) == 2, audit
    assert audit[0].startswith(
        f"policy warn {LEAF_ADVISORY}: crate=leaf version=0.3.2 client=127.0.0.1 mode=report"
    )
    assert audit[1].startswith("policy warn license: crate=gplonly version=1.0.0 client=127.0.0.1")


async def test_deny_and_allow_entries_at_the_door(
    registry: FakeRegistry, mirror_factory: MirrorFactory, db: Path
) -> None:
    publish_policy_tree(registry)
    mirror = await mirror_factory(
        policy__mode="enforce",
        policy__advisory_db=db,
        policy__deny=("top@<1.1",),
        policy__allow=("leaf@=0.3.2",),
    )
    refused = await mirror.get("/api/v1/crates/top/1.0.0/download")
    assert refused.status == 403 and refused.headers["X-Cratemirror-Policy"] == "deny"
    assert "top@<1.1" in await refused.text()
    assert (await mirror.get("/api/v1/crates/top/1.1.0/download")).status == 200
    allowed = await mirror.get("/api/v1/crates/leaf/0.3.2/download")  # the advisory is overridden
    assert allowed.status == 200
    view = _lines(await (await mirror.get("/index/le/af/leaf")).read())
    assert (view["0.3.0"]["yanked"], view["0.3.2"]["yanked"]) == (True, False)
    assert _lines(await (await mirror.get("/index/3/t/top")).read())["1.0.0"]["yanked"] is True
