"""The hit lane (issue 24): warm index and small-crate hits answered before the router from ready bytes.
A lane answer is the app's answer (status, headers but Date, body), counted the same (metrics, audit,
tokens); whatever the lane does not know (a conditional request, HEAD, HTTP/1.0, `Connection: close`,
another registry, a policy that changed or would say something) goes to the app as before."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from cratemirror.auth.tokens import TokenRecord, hash_token, write_records
from cratemirror.cache.audit import AUDIT_FILE, AuditDb
from cratemirror.config.schema import RegistryConfig
from cratemirror.http.audit import AUDIT
from cratemirror.http.context import MIRROR
from tests.conftest import LANES, MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path
from tests.mirror_process import metric_value

CRATE = "/api/v1/crates/serde/1.0.0/download"
NOT_MATCHING = {"If-None-Match": '"not-this-one"'}  # the app's path, with a 200 all the same


def idx(name: str) -> str:
    return f"/index/{index_path(name)}"


async def fetch(mirror: TestClient[Any, Any], path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    response = await mirror.get(
        path, headers={"Accept-Encoding": "identity", **headers}, auto_decompress=False
    )
    return response.status, dict(response.headers), await response.read()


def but_date(headers: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in headers.items() if key != "Date"}


async def counted(mirror: TestClient[Any, Any], kind: str) -> float:
    text = await (await mirror.get("/metrics")).text()
    return metric_value(text, "cratemirror_cache_requests_total", kind=kind, result="hit")


async def test_an_index_hit_from_the_lane_is_the_apps_answer(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    for version in range(40):  # over GZIP_MIN: a gzip answer too
        registry.add_crate("serde", f"1.0.{version}")
    mirror = await mirror_factory()
    lane = LANES[mirror]
    status, _, body = await fetch(mirror, idx("serde"))  # the miss makes the prepared answer
    assert (status, lane.answered) == (200, 0)
    lane_answer = await fetch(mirror, idx("serde"))
    assert lane.answered == 1
    app_answer = await fetch(mirror, idx("serde"), **NOT_MATCHING)
    assert lane.answered == 1
    for status, headers, same in (lane_answer, app_answer):
        assert (status, headers["X-Cache"], same) == (200, "HIT", body)
    assert but_date(lane_answer[1]) == but_date(app_answer[1])
    assert await counted(mirror, "index") == 2  # the lane's hit and the app's

    # gzip: the app's path makes the gzipped body; from then on the lane sends it as the app does.
    app_gzip = await fetch(mirror, idx("serde"), **{"Accept-Encoding": "gzip", **NOT_MATCHING})
    lane_gzip = await fetch(mirror, idx("serde"), **{"Accept-Encoding": "gzip"})
    assert lane.answered == 2
    assert but_date(lane_gzip[1]) == but_date(app_gzip[1]) and lane_gzip[2] == app_gzip[2]
    assert gzip.decompress(lane_gzip[2]) == body and lane_gzip[1]["Content-Encoding"] == "gzip"


async def test_a_small_crate_hit_from_the_lane_is_the_apps_answer_and_audited(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    tarball = registry.add_crate("serde", "1.0.0").data
    mirror = await mirror_factory()
    lane = LANES[mirror]
    miss = await fetch(mirror, CRATE)
    app_answer = await fetch(mirror, CRATE)  # a hit from the store: remembered for the lane
    lane_answer = await fetch(mirror, CRATE)
    assert lane.answered == 1
    assert (miss[1]["X-Cache"], app_answer[1]["X-Cache"], lane_answer[1]["X-Cache"]) == ("MISS", "HIT", "HIT")
    assert lane_answer[2] == app_answer[2] == miss[2] == tarball
    assert but_date(lane_answer[1]) == but_date(app_answer[1])
    assert await counted(mirror, "crate") == 2
    assert registry.count("/download") == 1

    await mirror.app[AUDIT].flush()
    db = AuditDb(tmp_path / "cache" / AUDIT_FILE, readonly=True)
    try:
        assert [(r.crate, r.result, r.who, r.count) for r in db.select()] == [
            ("serde", "served", "127.0.0.1", 3)
        ]
    finally:
        db.close()


async def raw_request(mirror: TestClient[Any, Any], request: bytes) -> bytes:
    """One request on a connection of its own, and everything the mirror sends until it closes."""
    assert mirror.host is not None and mirror.port is not None
    reader, writer = await asyncio.open_connection(mirror.host, mirror.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


async def test_what_the_lane_does_not_know_goes_to_the_app(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    tarball = registry.add_crate("serde", "1.0.0").data
    mirror = await mirror_factory(registries={"corp": RegistryConfig(index_url=registry.index_url)})
    lane = LANES[mirror]
    for path in (
        idx("serde"),
        CRATE,
        CRATE,
        f"/registries/corp{idx('serde')}",
        f"/registries/corp{idx('serde')}",
    ):
        assert (await fetch(mirror, path))[0] == 200
    assert lane.answered == 0  # misses, the first hit of a crate, another registry's index
    etag = (await fetch(mirror, CRATE))[1]["Etag"]
    assert lane.answered == 1

    assert (await fetch(mirror, CRATE, **{"If-None-Match": etag}))[0] == 304
    head = await mirror.head(CRATE)
    assert head.status == 200 and head.headers["X-Cache"] == "HIT"
    closing = await fetch(mirror, CRATE, Connection="close")
    assert closing[0] == 200 and closing[1]["Connection"] == "close"
    old = await raw_request(mirror, f"GET {CRATE} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    assert old.startswith(b"HTTP/1.0 200 OK\r\n") and old.endswith(tarball)
    unknown = await fetch(mirror, "/api/v1/crates/serde/9.9.9/download")
    assert unknown[0] == 404
    assert lane.answered == 1


async def test_the_lane_asks_for_a_token_as_the_app_does(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    registry.add_crate("serde", "1.0.0")
    tokens = tmp_path / "tokens.yaml"
    write_records(tokens, [TokenRecord("ci", hash_token("tok-ci"), dt.datetime.now(dt.UTC))])
    mirror = await mirror_factory(auth__required=True, auth__tokens_file=tokens)
    lane = LANES[mirror]
    token = {"Authorization": "tok-ci"}
    for path in (idx("serde"), CRATE, CRATE):
        assert (await fetch(mirror, path, **token))[0] == 200
    for path in (idx("serde"), CRATE):
        assert (await fetch(mirror, path))[0] == 401  # no token: the app's 401
        assert (await fetch(mirror, path, Authorization="tok-nope"))[0] == 401
        assert (await fetch(mirror, path, **token))[0] == 200
    assert lane.answered == 2
    await mirror.app[AUDIT].flush()
    db = AuditDb(tmp_path / "cache" / AUDIT_FILE, readonly=True)
    try:
        assert {(r.who, r.result) for r in db.select()} == {("ci", "served")}
    finally:
        db.close()


async def test_a_policy_change_or_word_keeps_a_crate_off_the_lane(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    registry.add_crate("serde", "1.0.0")
    registry.add_crate("watched", "0.1.0")
    mirror = await mirror_factory(policy__mode="report", policy__deny=("watched",))
    lane = LANES[mirror]
    watched = "/api/v1/crates/watched/0.1.0/download"
    for _ in range(3):  # report mode: each download of a denied crate is logged and counted
        assert (await fetch(mirror, watched))[0] == 200
    assert lane.answered == 0
    text = await (await mirror.get("/metrics")).text()
    assert metric_value(text, "cratemirror_policy_decisions_total", action="warn", rule="deny") == 3

    for _ in range(2):
        assert (await fetch(mirror, CRATE))[0] == 200
    assert (await fetch(mirror, CRATE))[0] == 200
    assert lane.answered == 1
    mirror.app[MIRROR].policy.changes += 1  # as an advisory database reload does
    assert (await fetch(mirror, CRATE))[0] == 200  # the app's path, which makes a new answer
    assert lane.answered == 1
    assert (await fetch(mirror, CRATE))[0] == 200
    assert lane.answered == 2
