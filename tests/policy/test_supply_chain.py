"""The release-age cooldown and internal names at the mirror's door (in-process mirror, the fake
upstream on loopback): held versions yanked in the view and refused with their age, the view's ETag
changing when a version ages past the cooldown, allow entries and advisory fixes passing, first-seen
times for lines without pubtime; internal names answered 404 without a request upstream, while a
private registry serves them."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from cratemirror.config.schema import RegistryConfig
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry
from tests.mirror_process import metric_value, wait_until
from tests.policy_support import write_advisory

Client = TestClient[Any, Any]
OLD = "2020-01-02T03:04:05Z"


def now_rfc3339(offset: float = 0.0) -> str:
    return datetime.fromtimestamp(time.time() + offset, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def yanked(mirror: Client, path: str) -> tuple[dict[str, bool], str]:
    response = await mirror.get(path)
    assert response.status == 200
    body = await response.read()
    lines = [json.loads(line) for line in body.splitlines()]
    return {line["vers"]: line["yanked"] for line in lines}, response.headers["ETag"]


async def test_a_young_version_is_held_back_until_it_ages(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    registry.add_crate("fresh", "1.0.0", pubtime=OLD)
    registry.add_crate("fresh", "1.1.0", pubtime=now_rfc3339())
    mirror = await mirror_factory(policy__mode="enforce", policy__min_release_age=3.0)
    view, etag = await yanked(mirror, "/index/fr/es/fresh")
    assert view == {"1.0.0": False, "1.1.0": True}
    response = await mirror.get("/api/v1/crates/fresh/1.1.0/download")
    text = await response.text()
    assert response.status == 403, text
    assert response.headers["X-Cratemirror-Policy"] == "cooldown"
    assert "fresh 1.1.0 was published" in text and "policy.min_release_age" in text and "passes at" in text
    assert (await mirror.get("/api/v1/crates/fresh/1.0.0/download")).status == 200
    assert registry.count("/fresh/1.1.0/") == 0  # a held-back version is never fetched

    async def aged() -> bool:
        return (await yanked(mirror, "/index/fr/es/fresh"))[0] == {"1.0.0": False, "1.1.0": False}

    await wait_until(aged, "1.1.0 to pass its 3 s cooldown", timeout=15, interval=0.2)
    assert (await yanked(mirror, "/index/fr/es/fresh"))[1] != etag  # the view changed: so does its ETag
    assert (await mirror.get("/api/v1/crates/fresh/1.1.0/download")).status == 200


async def test_allow_entries_and_advisory_fixes_pass_the_cooldown(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    db = tmp_path / "advisory-db"
    write_advisory(db, "patchy", "RUSTSEC-2099-0100", patched=[">= 2.0.1"])
    registry.add_crate("patchy", "2.0.0", pubtime=OLD)
    registry.add_crate("patchy", "2.0.1", pubtime=now_rfc3339())  # the fix: not held back
    registry.add_crate("patchy", "2.0.2", pubtime=now_rfc3339())  # a later release: held back
    registry.add_crate("trusted", "1.0.0", pubtime=now_rfc3339())
    mirror = await mirror_factory(
        policy__mode="enforce", policy__min_release_age=3600, policy__advisory_db=db,
        policy__allow=("trusted",),
    )  # fmt: skip
    assert (await yanked(mirror, "/index/pa/tc/patchy"))[0] == {"2.0.0": True, "2.0.1": False, "2.0.2": True}
    assert (await mirror.get("/api/v1/crates/patchy/2.0.1/download")).status == 200
    assert (await mirror.get("/api/v1/crates/patchy/2.0.2/download")).status == 403
    assert (await yanked(mirror, "/index/tr/us/trusted"))[0] == {"1.0.0": False}
    assert (await mirror.get("/api/v1/crates/trusted/1.0.0/download")).status == 200

    strict = await mirror_factory(
        cache_dir=tmp_path / "strict", policy__mode="enforce", policy__min_release_age=3600,
        policy__advisory_db=db, policy__cooldown_exempts_fixes=False,
    )  # fmt: skip
    assert (await yanked(strict, "/index/pa/tc/patchy"))[0]["2.0.1"] is True


async def test_without_pubtime_a_line_is_timed_from_when_the_mirror_first_saw_it(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    registry.add_crate("plain", "1.0.0")  # no pubtime: in the first copy seen, it is the baseline
    mirror = await mirror_factory(cache__index_ttl=0, policy__mode="enforce", policy__min_release_age=3600)
    assert (await yanked(mirror, "/index/pl/ai/plain"))[0] == {"1.0.0": False}
    registry.add_crate("plain", "1.1.0")  # appears later: first seen now
    registry.add_crate("plain", "1.2.0", pubtime=now_rfc3339(7 * 86400))  # a future pubtime is not believed
    assert (await yanked(mirror, "/index/pl/ai/plain"))[0] == {"1.0.0": False, "1.1.0": True, "1.2.0": True}
    # Kept durably: a new process on the same cache dir still holds them back.
    again = await mirror_factory(
        cache_dir=tmp_path / "cache", cache__index_ttl=0, policy__mode="enforce", policy__min_release_age=3600
    )
    assert (await yanked(again, "/index/pl/ai/plain"))[0] == {"1.0.0": False, "1.1.0": True, "1.2.0": True}


async def test_internal_names_never_reach_crates_io(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    registry.add_crate("acme-billing", "1.0.0")
    registry.add_crate("acme_util", "1.0.0")
    registry.add_crate("serde", "1.0.0")
    # The same fake registry plays a private one too: there, internal names are served as before.
    mirror = await mirror_factory(
        policy__internal_names=("acme-*",), registries={"corp": RegistryConfig(index_url=registry.index_url)}
    )
    for path in (
        "/index/ac/me/acme-billing", "/index/ac/me/acme_billing", "/index/ac/me/acme_util",
        "/api/v1/crates/acme-billing/1.0.0/download", "/api/v1/crates/ACME_util/1.0.0/download",
    ):  # fmt: skip
        response = await mirror.get(path)
        assert response.status == 404, path
    assert registry.count("acme") == 0  # not one request upstream
    assert (await mirror.get("/index/se/rd/serde")).status == 200
    metrics = await (await mirror.get("/metrics")).text()
    assert metric_value(metrics, "cratemirror_policy_decisions_total", action="block", rule="internal") == 5
    assert (await mirror.get("/registries/corp/index/ac/me/acme-billing")).status == 200
    assert (await mirror.get("/registries/corp/api/v1/crates/acme-billing/1.0.0/download")).status == 200
    assert registry.count("acme") == 2
