"""Crate downloads through the mirror: verified bytes, headers, caching, odd names and versions, faults."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import MirrorFactory
from tests.fake_upstream import REAL_INDEX, FakeRegistry
from tests.mirror_process import metric_value, raw_url

MiB = 1024 * 1024
LARGE = 6 * MiB  # above the size the mirror verifies before sending: it streams


@pytest.fixture
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[FakeRegistry]:
    """The conftest registry, with crates published; `indirect` parametrisation sets its dl template."""
    fake = FakeRegistry(getattr(request, "param", None))
    fake.add_crate("serde", "1.0.0")
    fake.add_crate("serde", "1.0.1")
    fake.add_crate("Inflect", "0.1.0")
    fake.add_crate("meta", "1.0.0+build.7")
    fake.add_crate("z", "0.1.0")
    async with fake:
        yield fake


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dl_path(name: str, version: str) -> str:
    return f"/api/v1/crates/{name}/{version}/download"


def tarball_requests(registry: FakeRegistry) -> int:
    """Upstream requests for anything but the index (i.e. tarballs), whatever the dl template."""
    return sum(n for path, n in registry.requests.items() if not path.startswith("/index/"))


def one_line(text: str) -> bool:
    return text.endswith("\n") and text.count("\n") == 1 and bool(text.strip())


async def metrics_text(mirror: TestClient[Any, Any]) -> str:
    response = await mirror.get("/metrics")
    assert response.status == 200
    return await response.text()


def stored_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "crates").rglob("*") if p.is_file())


def temp_files(cache: Path) -> list[Path]:
    return sorted((cache / "tmp").iterdir())


# ---- the happy path -----------------------------------------------------------------------------------


async def test_download_miss_then_hit(
    registry: FakeRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    cv = registry.get_version("serde", "1.0.0")
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        for expected_cache in ("MISS", "HIT"):
            headers = {"Accept-Encoding": "gzip, deflate"}  # as curl/cargo send it
            async with raw.get(mirror.make_url(dl_path("serde", "1.0.0")), headers=headers) as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "application/gzip"
                assert "Content-Encoding" not in r.headers
                assert r.headers["ETag"] == f'"{cv.cksum}"'
                assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
                assert r.headers["X-Cache"] == expected_cache
                body = await r.read()
            assert body == cv.data
            assert sha256(body) == cv.cksum
    assert registry.count("/crates/serde/1.0.0/download") == 1
    assert registry.count("/index/se/rd/serde") == 1
    assert tarball_requests(registry) == 1
    assert stored_files(tmp_path / "cache") == [tmp_path / "cache/crates/serde/serde-1.0.0.crate"]
    assert temp_files(tmp_path / "cache") == []

    text = await metrics_text(mirror)
    assert metric_value(text, "cratemirror_cache_requests_total", kind="crate", result="miss") == 1
    assert metric_value(text, "cratemirror_cache_requests_total", kind="crate", result="hit") == 1
    # The checksum lookup a download does is not a client index request.
    assert metric_value(text, "cratemirror_cache_requests_total", kind="index") == 0


async def test_head_and_conditional_get(registry: FakeRegistry, mirror: TestClient[Any, Any]) -> None:
    cv = registry.get_version("serde", "1.0.1")
    miss = await mirror.head(dl_path("serde", "1.0.1"))
    assert miss.status == 200
    assert miss.headers["ETag"] == f'"{cv.cksum}"'
    assert miss.headers["Content-Type"] == "application/gzip"
    assert miss.headers["X-Cache"] == "MISS"
    assert await miss.read() == b""
    assert tarball_requests(registry) == 0  # a HEAD does not need the tarball

    assert (await (await mirror.get(dl_path("serde", "1.0.1"))).read()) == cv.data
    hit = await mirror.head(dl_path("serde", "1.0.1"))
    assert hit.status == 200
    assert hit.headers["X-Cache"] == "HIT"
    assert hit.headers["ETag"] == f'"{cv.cksum}"'
    assert int(hit.headers["Content-Length"]) == len(cv.data)
    assert await hit.read() == b""

    not_modified = await mirror.get(dl_path("serde", "1.0.1"), headers={"If-None-Match": f'"{cv.cksum}"'})
    assert not_modified.status == 304
    assert await not_modified.read() == b""
    other = await mirror.get(dl_path("serde", "1.0.1"), headers={"If-None-Match": '"nope"'})
    assert other.status == 200
    assert await other.read() == cv.data
    assert registry.count("/crates/serde/1.0.1/download") == 1
    assert tarball_requests(registry) == 1
    assert registry.count("/index/se/rd/serde") == 1


async def test_unknown_crate_and_version_are_404_without_tarball_request(
    registry: FakeRegistry, mirror: TestClient[Any, Any]
) -> None:
    for name, version in (("serde", "9.9.9"), ("nope", "1.0.0"), ("serde", "1.0.0-rc.1")):
        response = await mirror.get(dl_path(name, version))
        assert response.status == 404, (name, version)
        assert one_line(await response.text())
    assert tarball_requests(registry) == 0
    # serde: fetched for 9.9.9, then revalidated once for the also-missing 1.0.0-rc.1 (it may be new).
    assert registry.count("/index/se/rd/serde") == 2
    assert registry.count("/index/no/pe/nope") == 1


async def test_uppercase_name_keeps_its_case_upstream(
    registry: FakeRegistry, mirror: TestClient[Any, Any]
) -> None:
    cv = registry.get_version("Inflect", "0.1.0")
    response = await mirror.get(dl_path("Inflect", "0.1.0"))
    assert response.status == 200
    assert await response.read() == cv.data
    assert registry.count("/crates/Inflect/0.1.0/download") == 1
    assert registry.count("/crates/inflect/") == 0
    assert registry.count("/index/in/fl/inflect") == 1
    # Asked in another case, the mirror serves the canonical file (no second fetch).
    lower = await mirror.get(dl_path("inflect", "0.1.0"))
    assert lower.status == 200
    assert await lower.read() == cv.data
    assert tarball_requests(registry) == 1


@pytest.mark.parametrize("spelling", ["1.0.0+build.7", "1.0.0%2Bbuild.7", "1.0.0%2bbuild.7"])
async def test_build_metadata_version(
    registry: FakeRegistry, mirror: TestClient[Any, Any], spelling: str
) -> None:
    cv = registry.get_version("meta", "1.0.0+build.7")
    for expected_cache in ("MISS", "HIT"):
        # cargo sends a literal '+': the raw URL must reach the mirror unchanged.
        async with mirror.session.get(raw_url(str(mirror.make_url("")), dl_path("meta", spelling))) as r:
            assert r.status == 200, await r.text()
            assert r.headers["X-Cache"] == expected_cache
            assert sha256(await r.read()) == cv.cksum
    upstream_paths = [p for p in registry.requests if p.startswith("/crates/")]
    assert len(upstream_paths) == 1
    assert upstream_paths[0] in (
        "/crates/meta/1.0.0%2Bbuild.7/download",
        "/crates/meta/1.0.0+build.7/download",
    )
    assert tarball_requests(registry) == 1


DL_TEMPLATES = [
    "{base}/files/{lowerprefix}/{crate}/{crate}-{version}.crate",
    "{base}/p/{prefix}/{crate}/{version}/dl",
    "{base}/by-sum/{sha256-checksum}",
    "{base}/q?c={crate}&v={version}",
    "{base}/all/{prefix}/{lowerprefix}/{crate}/{version}/{sha256-checksum}",
]


@pytest.mark.parametrize("registry", DL_TEMPLATES, indirect=True)
async def test_upstream_dl_templates(registry: FakeRegistry, mirror: TestClient[Any, Any]) -> None:
    for name, version in (("Inflect", "0.1.0"), ("z", "0.1.0"), ("meta", "1.0.0+build.7")):
        cv = registry.get_version(name, version)
        async with mirror.session.get(raw_url(str(mirror.make_url("")), dl_path(name, version))) as r:
            assert r.status == 200, (name, version, await r.text())
            assert await r.read() == cv.data
        target = urlsplit(registry.download_url(cv))
        fetched = [p for p in registry.requests if not p.startswith("/index/")]
        assert any(p.replace("%2B", "+") == target.path for p in fetched), (target.path, fetched)
    assert tarball_requests(registry) == 3
    assert registry.count("/crates/") == 0  # the template's URLs, never the default path
    assert registry.count("/index/config.json") == 1


# ---- freshness of the checksum lookup ---------------------------------------------------------------


async def test_version_published_after_the_index_was_cached(
    registry: FakeRegistry, mirror: TestClient[Any, Any]
) -> None:
    assert (await mirror.get(dl_path("serde", "1.0.0"))).status == 200
    assert registry.count("/index/se/rd/serde") == 1
    new = registry.add_crate("serde", "1.1.0")
    response = await mirror.get(dl_path("serde", "1.1.0"))
    assert response.status == 200, await response.text()
    assert await response.read() == new.data
    assert registry.count("/index/se/rd/serde") == 2  # revalidated once, because 1.1.0 was missing
    assert registry.count("/crates/serde/1.1.0/download") == 1
    index = await mirror.get("/index/se/rd/serde")  # and clients now see the new version too
    assert await index.read() == registry.index_file("serde")
    assert registry.count("/index/se/rd/serde") == 2
    assert tarball_requests(registry) == 2


async def test_version_of_a_real_index_file_missing_upstream_is_404(
    registry: FakeRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    """The version is in the index (crates.io's real serde file) but the store answers 403, like
    static.crates.io for a missing object: cargo must see 404 (it treats 403 as a hard error)."""
    real = (REAL_INDEX / "se/rd/serde").read_bytes()
    registry.add_raw_index_file("se/rd/serde", real)
    version = json.loads(real.splitlines()[-1])["vers"]
    response = await mirror.get(dl_path("serde", version))
    assert response.status == 404
    assert one_line(await response.text())
    assert registry.count(f"/crates/serde/{version}/download") == 1
    assert tarball_requests(registry) == 1
    assert stored_files(tmp_path / "cache") == []
    assert temp_files(tmp_path / "cache") == []


async def test_yanked_version_stays_downloadable(
    registry: FakeRegistry, mirror: TestClient[Any, Any]
) -> None:
    """A Cargo.lock may pin a version yanked since: cargo still downloads it."""
    cv = registry.add_crate("serde", "0.9.0", yanked=True)
    response = await mirror.get(dl_path("serde", "0.9.0"))
    assert response.status == 200
    assert await response.read() == cv.data
    assert registry.count("/crates/serde/0.9.0/download") == 1
    assert tarball_requests(registry) == 1


async def test_missing_versions_do_not_amplify_upstream_requests(
    registry: FakeRegistry, mirror: TestClient[Any, Any]
) -> None:
    """Each request for a version the cached index lacks may revalidate the index once (it may be newly
    published), but a stream of such requests (a scanner, a broken client) must not turn into one
    upstream request each: crates.io rate-limits the mirror, and every cargo behind it pays."""
    assert (await mirror.get(dl_path("serde", "1.0.0"))).status == 200
    assert registry.count("/index/se/rd/serde") == 1
    for patch in range(10):
        response = await mirror.get(dl_path("serde", f"9.9.{patch}"))
        assert response.status == 404
    assert tarball_requests(registry) == 1
    assert registry.count("/index/se/rd/serde") <= 2, dict(registry.requests)


# ---- integrity ----------------------------------------------------------------------------------------


async def test_corrupt_upstream_bytes_are_refused(
    registry: FakeRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    registry.corrupt_crates = True
    response = await mirror.get(dl_path("serde", "1.0.0"))
    assert response.status == 502
    text = await response.text()
    assert one_line(text)
    assert "checksum" in text
    assert stored_files(cache) == []
    assert temp_files(cache) == []
    assert metric_value(await metrics_text(mirror), "cratemirror_checksum_failures_total") == 1

    registry.corrupt_crates = False
    good = await mirror.get(dl_path("serde", "1.0.0"))
    assert good.status == 200
    assert good.headers["X-Cache"] == "MISS"
    assert sha256(await good.read()) == registry.get_version("serde", "1.0.0").cksum
    assert registry.count("/crates/serde/1.0.0/download") == 2
    assert tarball_requests(registry) == 2
    assert len(stored_files(cache)) == 1
    assert metric_value(await metrics_text(mirror), "cratemirror_checksum_failures_total") == 1


async def test_large_corrupt_crate_never_completes(
    registry: FakeRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cv = registry.add_crate("big", "1.0.0", pad_to=LARGE)
    assert len(cv.data) >= LARGE
    registry.corrupt_crates = True
    body = b""
    status = 0
    try:
        async with mirror.session.get(mirror.make_url(dl_path("big", "1.0.0"))) as r:
            status = r.status
            body = await r.read()
    except aiohttp.ClientPayloadError:
        pass  # the connection was cut before the last byte: what cargo must see
    assert not (status == 200 and len(body) == len(cv.data)), "a corrupt crate was delivered complete"
    if status == 200:
        assert sha256(body) != sha256(cv.data)
    assert stored_files(cache) == []
    assert temp_files(cache) == []
    assert metric_value(await metrics_text(mirror), "cratemirror_checksum_failures_total") == 1
    assert registry.count("/crates/big/1.0.0/download") == 1
    assert tarball_requests(registry) == 1


async def test_large_crate_streams(
    registry: FakeRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    cv = registry.add_crate("big", "1.0.0", pad_to=LARGE)
    for expected_cache in ("MISS", "HIT"):
        async with mirror.session.get(mirror.make_url(dl_path("big", "1.0.0"))) as r:
            assert r.status == 200
            assert r.headers["X-Cache"] == expected_cache
            assert int(r.headers["Content-Length"]) == len(cv.data)
            digest = hashlib.sha256()
            size = 0
            async for chunk in r.content.iter_chunked(64 * 1024):
                digest.update(chunk)
                size += len(chunk)
        assert size == len(cv.data)
        assert digest.hexdigest() == cv.cksum
    assert registry.count("/crates/big/1.0.0/download") == 1
    assert tarball_requests(registry) == 1
    assert temp_files(tmp_path / "cache") == []


@pytest.mark.parametrize("status", [403, 404])
async def test_upstream_refuses_a_listed_version(
    registry: FakeRegistry, mirror: TestClient[Any, Any], tmp_path: Path, status: int
) -> None:
    """The index lists the version but the store refuses it (static.crates.io says 403 for a missing
    object): the client gets 404 and nothing is cached."""
    registry.add_crate("serde", "2.0.0")
    # The index (listing 2.0.0) and the upstream config.json are cached by a good download first.
    assert (await mirror.get(dl_path("serde", "1.0.0"))).status == 200
    registry.status_override = status
    response = await mirror.get(dl_path("serde", "2.0.0"))
    assert response.status == 404
    assert one_line(await response.text())
    registry.status_override = None
    assert stored_files(tmp_path / "cache") == [tmp_path / "cache/crates/serde/serde-1.0.0.crate"]
    assert temp_files(tmp_path / "cache") == []
    assert registry.count("/crates/serde/2.0.0/download") == 1
    assert tarball_requests(registry) == 2
    assert registry.count("/index/se/rd/serde") == 1


async def test_upstream_5xx_is_502_and_not_cached(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    mirror = await mirror_factory(upstream__retries=0)
    assert (await mirror.get(dl_path("serde", "1.0.1"))).status == 200  # caches index and config.json
    registry.status_override = 500
    response = await mirror.get(dl_path("serde", "1.0.0"))
    assert response.status == 502
    assert one_line(await response.text())
    registry.status_override = None
    assert temp_files(tmp_path / "cache") == []
    again = await mirror.get(dl_path("serde", "1.0.0"))
    assert again.status == 200
    assert again.headers["X-Cache"] == "MISS"
    assert registry.count("/crates/serde/1.0.0/download") == 2
    assert tarball_requests(registry) == 3
