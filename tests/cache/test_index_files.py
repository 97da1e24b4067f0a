"""The mirror's sparse index: config.json and index files, byte for byte, with validators and freshness."""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from cratemirror.config.schema import ServerConfig
from tests.conftest import MirrorFactory
from tests.fake_upstream import REAL_INDEX, FakeRegistry, index_path

# Large (syn ~500 KB), an uppercase name (Inflector), a dash (aho-corasick), features2-era lines (serde).
REAL_FILES = ["3/s/syn", "in/fl/inflector", "ah/o-/aho-corasick", "se/rd/serde"]


def publish(registry: FakeRegistry) -> None:
    registry.add_crate("serde", "1.0.0")
    registry.add_crate("serde", "1.0.1")
    registry.add_crate("Inflect", "0.1.0")
    registry.add_crate("a", "1.0.0")
    registry.add_crate("ab", "1.0.0")
    registry.add_crate("syn", "2.0.0")
    registry.add_crate("a-b_c", "0.1.0")


@pytest.fixture
async def raw_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that does not decode Content-Encoding: what it reads is what went over the wire."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def get_raw(session: aiohttp.ClientSession, mirror: TestClient[Any, Any], path: str) -> bytes:
    """The identity representation, as it went over the wire (gzip is tested on its own below)."""
    async with session.get(mirror.make_url(path), headers={"Accept-Encoding": "identity"}) as response:
        assert response.status == 200, (path, response.status, await response.text())
        assert "Content-Encoding" not in response.headers
        return await response.read()


# ---- config.json ----------------------------------------------------------------------------------------


async def config_of(mirror: TestClient[Any, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await mirror.get("/index/config.json", headers=headers)
    assert response.status == 200
    document: dict[str, Any] = json.loads(await response.read())
    assert not document["dl"].endswith("/")
    assert "//" not in document["dl"].split("://", 1)[1]
    return document


async def test_config_json_from_host(registry: FakeRegistry, mirror: TestClient[Any, Any]) -> None:
    base = f"http://127.0.0.1:{mirror.port}"
    assert await config_of(mirror) == {"dl": f"{base}/api/v1/crates", "api": base}
    assert await config_of(mirror, {"Host": "mirror.example:8080"}) == {
        "dl": "http://mirror.example:8080/api/v1/crates",
        "api": "http://mirror.example:8080",
    }
    head = await mirror.head("/index/config.json")
    assert head.status == 200
    assert await head.read() == b""
    assert registry.requests.total() == 0  # config.json is the mirror's own, never upstream's


async def test_config_json_from_forwarded_headers(
    registry: FakeRegistry, mirror: TestClient[Any, Any]
) -> None:
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "crates.example.com"}
    assert await config_of(mirror, forwarded) == {
        "dl": "https://crates.example.com/api/v1/crates",
        "api": "https://crates.example.com",
    }
    # A chain of proxies: the first (client-facing) value counts.
    chained = {"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "crates.example.com:8443, inner"}
    assert (await config_of(mirror, chained))["dl"] == "https://crates.example.com:8443/api/v1/crates"
    # Garbage in the headers never ends up in the document.
    bad = {"X-Forwarded-Proto": "javascript", "X-Forwarded-Host": "evil/x?y"}
    assert (await config_of(mirror, bad))["dl"] == f"http://127.0.0.1:{mirror.port}/api/v1/crates"
    assert registry.requests.total() == 0


@pytest.mark.parametrize(
    ("public_url", "base"),
    [
        ("https://crates.example.com", "https://crates.example.com"),
        ("https://crates.example.com/", "https://crates.example.com"),
        ("https://example.com/mirror/", "https://example.com/mirror"),
    ],
)
async def test_config_json_from_public_url(
    registry: FakeRegistry, mirror_factory: MirrorFactory, public_url: str, base: str
) -> None:
    server = ServerConfig(host="127.0.0.1", port=8080, workers=1, public_url=public_url)
    mirror = await mirror_factory(server=server)
    forwarded = {"X-Forwarded-Proto": "http", "X-Forwarded-Host": "other.example"}
    for headers in (None, forwarded):
        assert await config_of(mirror, headers) == {"dl": f"{base}/api/v1/crates", "api": base}
    assert registry.requests.total() == 0


# ---- index files: bytes -------------------------------------------------------------------------------


async def test_generated_files_byte_for_byte(
    registry: FakeRegistry, mirror: TestClient[Any, Any], raw_session: aiohttp.ClientSession
) -> None:
    publish(registry)
    names = ["serde", "Inflect", "a", "ab", "syn", "a-b_c"]
    for name in names:
        body = await get_raw(raw_session, mirror, f"/index/{index_path(name)}")
        assert body == registry.index_file(name), name
        assert registry.count(f"/index/{index_path(name)}") == 1
    assert registry.requests.total() == len(names)
    # The mirror asked for gzip (the fake then compresses) and still hands out the identity bytes.
    encodings = {headers.get("Accept-Encoding", "") for _, _, headers in registry.request_log}
    assert all("gzip" in value for value in encodings), encodings


@pytest.mark.parametrize("path", REAL_FILES)
async def test_real_crates_io_files_byte_for_byte(
    registry: FakeRegistry, mirror: TestClient[Any, Any], raw_session: aiohttp.ClientSession, path: str
) -> None:
    real = (REAL_INDEX / path).read_bytes()
    registry.add_raw_index_file(path, real)
    async with raw_session.get(mirror.make_url(f"/index/{path}"), headers={"Accept-Encoding": "gzip"}) as r:
        assert r.status == 200
        wire = await r.read()
        body = gzip.decompress(wire) if r.headers.get("Content-Encoding") == "gzip" else wire
        assert r.headers["X-Cache"] == "MISS"
    assert body == real
    assert await get_raw(raw_session, mirror, f"/index/{path}") == real
    assert registry.count(f"/index/{path}") == 1
    assert registry.requests.total() == 1


async def test_gzip_upstream_is_decoded_not_forwarded(
    registry: FakeRegistry, mirror: TestClient[Any, Any], raw_session: aiohttp.ClientSession
) -> None:
    """The fake gzips whenever asked: the stored and served bytes must be the plain file, with no
    upstream Content-Encoding or Content-Length leaking into the answer."""
    real = (REAL_INDEX / "3/s/syn").read_bytes()
    registry.add_raw_index_file("3/s/syn", real)
    async with raw_session.get(
        mirror.make_url("/index/3/s/syn"), headers={"Accept-Encoding": "identity"}
    ) as r:
        assert r.status == 200
        assert "Content-Encoding" not in r.headers
        if "Content-Length" in r.headers:
            assert int(r.headers["Content-Length"]) == len(real)
        assert await r.read() == real
    (_, _, upstream_headers), *_ = registry.request_log
    assert "gzip" in upstream_headers.get("Accept-Encoding", "")
    assert registry.requests.total() == 1


# ---- validators and freshness -----------------------------------------------------------------------


async def test_validators_and_conditional_requests(
    registry: FakeRegistry, mirror: TestClient[Any, Any]
) -> None:
    publish(registry)
    url = "/index/se/rd/serde"
    first = await mirror.get(url)
    assert first.status == 200
    assert first.headers["Content-Type"].startswith("text/plain")
    etag = first.headers["ETag"]
    last_modified = first.headers["Last-Modified"]
    assert etag.startswith('"') and etag.endswith('"')
    assert email.utils.parsedate_to_datetime(last_modified) is not None
    assert await first.read() == registry.index_file("serde")

    matching = await mirror.get(url, headers={"If-None-Match": etag})
    assert matching.status == 304
    assert await matching.read() == b""
    assert matching.headers["ETag"] == etag
    assert (await mirror.get(url, headers={"If-None-Match": f'"other", {etag}'})).status == 304
    other = await mirror.get(url, headers={"If-None-Match": '"not-the-etag"'})
    assert other.status == 200
    assert await other.read() == registry.index_file("serde")
    assert (await mirror.get(url, headers={"If-Modified-Since": last_modified})).status == 304
    old = await mirror.get(url, headers={"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"})
    assert old.status == 200
    assert await old.read() == registry.index_file("serde")
    # If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2).
    both = {"If-None-Match": '"not-the-etag"', "If-Modified-Since": last_modified}
    assert (await mirror.get(url, headers=both)).status == 200
    assert registry.count("/index/se/rd/serde") == 1
    assert registry.requests.total() == 1


async def test_head(registry: FakeRegistry, mirror: TestClient[Any, Any]) -> None:
    publish(registry)
    head = await mirror.head("/index/se/rd/serde")  # a miss: fetched and stored
    assert head.status == 200
    assert head.headers["ETag"]
    assert head.headers["X-Cache"] == "MISS"
    assert await head.read() == b""
    get = await mirror.get("/index/se/rd/serde")
    assert get.headers["X-Cache"] == "HIT"
    assert get.headers["ETag"] == head.headers["ETag"]
    head_hit = await mirror.head("/index/se/rd/serde")
    assert head_hit.status == 200 and head_hit.headers["X-Cache"] == "HIT"
    missing = await mirror.head("/index/no/pe/nope")
    assert missing.status == 404
    assert registry.count("/index/se/rd/serde") == 1
    assert registry.count("/index/no/pe/nope") == 1
    assert registry.requests.total() == 2


async def test_fresh_copy_is_served_without_upstream(
    registry: FakeRegistry, mirror: TestClient[Any, Any]
) -> None:
    publish(registry)
    first = await mirror.get("/index/in/fl/inflect")
    assert first.headers["X-Cache"] == "MISS"
    body = await first.read()
    registry.down = True  # would reset any connection the mirror makes
    for _ in range(3):
        again = await mirror.get("/index/in/fl/inflect")
        assert again.status == 200
        assert again.headers["X-Cache"] == "HIT"
        assert again.headers["ETag"] == first.headers["ETag"]
        assert await again.read() == body
    assert registry.count("/index/in/fl/inflect") == 1
    assert registry.requests.total() == 1


async def test_revalidation_with_upstream_etag_and_yank(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    publish(registry)
    mirror = await mirror_factory(cache__index_ttl=0)
    first = await mirror.get("/index/se/rd/serde")
    assert first.status == 200 and first.headers["X-Cache"] == "MISS"
    mirror_etag = first.headers["ETag"]
    upstream_etag = _upstream_response_etag(registry)

    second = await mirror.get("/index/se/rd/serde")
    assert second.status == 200
    assert second.headers["X-Cache"] == "REVALIDATED"
    assert second.headers["ETag"] == mirror_etag
    assert await second.read() == registry.index_file("serde")
    method, path, sent = registry.request_log[-1]
    assert (method, path) == ("GET", "/index/se/rd/serde")
    assert sent.get("If-None-Match") == upstream_etag
    assert registry.count("/index/se/rd/serde") == 2

    registry.set_yanked("serde", "1.0.0", True)
    third = await mirror.get("/index/se/rd/serde")
    assert third.status == 200
    assert third.headers["X-Cache"] in ("MISS", "REVALIDATED")
    assert third.headers["ETag"] != mirror_etag
    body = await third.read()
    assert body == registry.index_file("serde")
    assert [json.loads(line)["yanked"] for line in body.splitlines()] == [True, False]
    # The client's old validator no longer matches: it must get the new bytes, not a 304.
    stale_client = await mirror.get("/index/se/rd/serde", headers={"If-None-Match": mirror_etag})
    assert stale_client.status == 200
    assert await stale_client.read() == body
    assert registry.count("/index/se/rd/serde") == 4
    assert registry.requests.total() == 4


def _upstream_response_etag(registry: FakeRegistry) -> str:
    """The ETag the fake sent for the serde file (computed as the fake does, from its body)."""
    return '"' + hashlib.sha256(registry.index_file("serde")).hexdigest()[:40] + '"'


async def test_unknown_crate_is_404(registry: FakeRegistry, mirror: TestClient[Any, Any]) -> None:
    publish(registry)
    for path in ("no/pe/nope", "1/z", "2/zz", "3/z/zzz", "in/fl/inflector"):
        response = await mirror.get(f"/index/{path}")
        assert response.status == 404, path
        text = await response.text()
        assert text.endswith("\n") and text.count("\n") == 1 and text.strip()
    again = await mirror.get("/index/no/pe/nope")  # remembered for negative_ttl
    assert again.status == 404
    assert registry.count("/index/no/pe/nope") == 1
    assert registry.requests.total() == 5


@pytest.mark.parametrize("upstream_status", [403, 410, 451])
async def test_upstream_gone_statuses_become_404(
    registry: FakeRegistry, mirror: TestClient[Any, Any], upstream_status: int
) -> None:
    publish(registry)
    registry.status_override = upstream_status
    response = await mirror.get("/index/se/rd/serde")
    assert response.status == 404
    assert registry.count("/index/se/rd/serde") == 1
    assert registry.requests.total() == 1


async def test_crate_removed_upstream_turns_404_after_revalidation(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    publish(registry)
    mirror = await mirror_factory(cache__index_ttl=0, cache__negative_ttl=0)
    assert (await mirror.get("/index/se/rd/serde")).status == 200
    registry.remove_crate("serde")
    assert (await mirror.get("/index/se/rd/serde")).status == 404
    registry.add_crate("serde", "2.0.0")
    back = await mirror.get("/index/se/rd/serde")
    assert back.status == 200
    assert await back.read() == registry.index_file("serde")
    assert registry.count("/index/se/rd/serde") == 3
    assert registry.requests.total() == 3


# ---- gzip for clients that accept it (cargo's curl does) ----------------------------------------------


@pytest.mark.parametrize("path", ["3/s/syn", "in/fl/inflector"])
async def test_gzip_when_accepted_decodes_to_the_upstream_bytes(
    registry: FakeRegistry, mirror: TestClient[Any, Any], raw_session: aiohttp.ClientSession, path: str
) -> None:
    real = (REAL_INDEX / path).read_bytes()
    registry.add_raw_index_file(path, real)
    url = mirror.make_url(f"/index/{path}")
    async with raw_session.get(url, headers={"Accept-Encoding": "gzip"}) as response:
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Vary"] == "Accept-Encoding"
        weak = response.headers["ETag"]
        wire = await response.read()
    assert gzip.decompress(wire) == real
    assert len(wire) < len(real) // 3
    async with raw_session.get(url, headers={"Accept-Encoding": "identity"}) as response:
        assert "Content-Encoding" not in response.headers
        assert await response.read() == real
        strong = response.headers["ETag"]
    assert weak == f"W/{strong}"
    # Either validator names the same file: a copy fetched either way revalidates to 304.
    for etag in (weak, strong):
        async with raw_session.get(url, headers={"Accept-Encoding": "gzip", "If-None-Match": etag}) as again:
            assert again.status == 304
    # Every worker compresses the same way: the gzipped bytes are the same on a second request.
    async with raw_session.get(url, headers={"Accept-Encoding": "gzip"}) as response:
        assert await response.read() == wire
    assert registry.count(f"/index/{path}") == 1


async def test_small_files_are_not_compressed(
    registry: FakeRegistry, mirror: TestClient[Any, Any], raw_session: aiohttp.ClientSession
) -> None:
    registry.add_crate("tiny", "1.0.0")
    async with raw_session.get(
        mirror.make_url(f"/index/{index_path('tiny')}"), headers={"Accept-Encoding": "gzip"}
    ) as response:
        assert "Content-Encoding" not in response.headers
        assert await response.read() == registry.index_file("tiny")
