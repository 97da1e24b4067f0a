"""Warm index hits from prepared answers (issue 24): the same bytes, validators and headers as the answer
that filled the cache, conditional and gzip answers from them, never past the entry's freshness or a
refresh, paths validated as before, and `cache.memory_size: 0` keeping none."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Mapping
from typing import Any

from aiohttp.test_utils import TestClient

from cratemirror.fleet.storage.disk import IndexEntry
from cratemirror.http.index_answers import IndexAnswers, make_answer
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path
from tests.mirror_process import metric_value

SAME = ("Content-Type", "ETag", "Last-Modified", "Vary")
DEADLINE = 10.0


def idx(name: str) -> str:
    return f"/index/{index_path(name)}"


async def fetch(
    mirror: TestClient[Any, Any], path: str, **headers: str
) -> tuple[int, Mapping[str, str], bytes]:
    # The test client asks for gzip unless told otherwise; cargo does too, wrk does not.
    response = await mirror.get(
        path, headers={"Accept-Encoding": "identity", **headers}, auto_decompress=False
    )
    return response.status, response.headers, await response.read()


async def index_hits(mirror: TestClient[Any, Any]) -> float:
    response = await mirror.get("/metrics")
    return metric_value(await response.text(), "cratemirror_cache_requests_total", kind="index", result="hit")


async def test_a_warm_hit_answers_as_the_fill_did(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    for version in range(40):  # over GZIP_MIN, so gzip applies
        registry.add_crate("serde", f"1.0.{version}")
    mirror = await mirror_factory()
    status, first, body = await fetch(mirror, idx("serde"))
    assert (status, first["X-Cache"]) == (200, "MISS")
    for _ in range(3):
        status, again, same = await fetch(mirror, idx("serde"))
        assert (status, again["X-Cache"], same) == (200, "HIT", body)
        assert {key: again[key] for key in SAME} == {key: first[key] for key in SAME}
    assert await index_hits(mirror) == 3

    status, headers, empty = await fetch(mirror, idx("serde"), **{"If-None-Match": first["ETag"]})
    assert (status, empty, headers["X-Cache"]) == (304, b"", "HIT")
    status, headers, empty = await fetch(
        mirror, idx("serde"), **{"If-Modified-Since": first["Last-Modified"]}
    )
    assert (status, empty) == (304, b"")

    status, headers, packed = await fetch(mirror, idx("serde"), **{"Accept-Encoding": "gzip"})
    assert (status, headers["Content-Encoding"], headers["ETag"]) == (200, "gzip", f"W/{first['ETag']}")
    assert gzip.decompress(packed) == body
    status, headers, again_packed = await fetch(mirror, idx("serde"), **{"Accept-Encoding": "gzip"})
    assert again_packed == packed
    assert registry.count(idx("serde")) == 1


async def test_paths_are_validated_with_answers_held(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    registry.add_crate("serde", "1.0.0")
    mirror = await mirror_factory()
    assert (await fetch(mirror, idx("serde")))[0] == 200
    for bad in (
        "/index/SE/RD/serde",
        "/index/se/rd/Serde/",
        "/index/xx/yy/serde",
    ):
        status, _, _ = await fetch(mirror, bad)
        assert status in (400, 404), bad
    assert (await fetch(mirror, "/index/se/rd/SERDE"))[0] == 400  # the prefix is the lowercased name's


async def test_an_answer_is_not_used_past_the_entrys_freshness(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    registry.add_crate("serde", "1.0.0")
    mirror = await mirror_factory(cache__index_ttl=0.3)
    assert (await fetch(mirror, idx("serde")))[1]["X-Cache"] == "MISS"
    assert (await fetch(mirror, idx("serde")))[1]["X-Cache"] == "HIT"
    registry.add_crate("serde", "1.0.1")
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:  # no event marks the TTL's end: poll, bounded
        _, headers, body = await fetch(mirror, idx("serde"))
        if headers["X-Cache"] != "HIT":
            break
        await asyncio.sleep(0.05)
    assert headers["X-Cache"] == "MISS" and b'"1.0.1"' in body


async def test_a_refresh_drops_the_answer(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    registry.add_crate("serde", "1.0.0")
    mirror = await mirror_factory(cache__index_ttl=3600)
    await fetch(mirror, idx("serde"))
    assert (await fetch(mirror, idx("serde")))[1]["X-Cache"] == "HIT"
    registry.add_crate("serde", "1.0.1")
    assert (await mirror.post("/-/refresh/serde")).status == 200
    status, headers, body = await fetch(mirror, idx("serde"))
    assert (status, headers["X-Cache"]) == (200, "HIT") and b'"1.0.1"' in body


async def test_memory_size_zero_keeps_no_answers(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    registry.add_crate("serde", "1.0.0")
    mirror = await mirror_factory(cache__memory_size=0)
    _, _, body = await fetch(mirror, idx("serde"))
    for _ in range(2):  # from the store each time, the same answer
        status, headers, again = await fetch(mirror, idx("serde"))
        assert (status, headers["X-Cache"], again) == (200, "HIT", body)
    assert registry.count(idx("serde")) == 1


def test_answers_are_bounded_by_their_budget() -> None:
    answers = IndexAnswers(64 * 1024)
    body = b"x" * (20 * 1024)
    for number in range(10):
        entry = IndexEntry(200, body, f'"{number}"', "Mon, 07 Dec 2026 00:00:00 GMT", time.time())
        answers.put("crates-io", f"3/a/a{number}", make_answer(entry, time.time() + 60, 0))
    held = [number for number in range(10) if answers.get("crates-io", f"3/a/a{number}", 0) is not None]
    assert held == [7, 8, 9]  # the least recently used went first
    assert answers.get("crates-io", "3/a/a9", 1) is None  # the policy changed since it was made
