"""Tests for the fake crates.io upstream (tests/fake_upstream.py), incl. one run of the real cargo."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import tarfile
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.fake_upstream import (
    CHUNK_SIZE,
    REAL_INDEX,
    SMALL_TREE_DEPS,
    SMALL_TREE_RESOLVED,
    Dep,
    FakeRegistry,
    index_path,
    make_crate_tarball,
    publish_small_tree,
    run_cargo,
    write_cargo_home,
    write_cargo_project,
)

CRATES_IO_SOURCE = "registry+https://github.com/rust-lang/crates.io-index"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
async def fake() -> AsyncIterator[FakeRegistry]:
    reg = FakeRegistry()
    reg.add_crate("serde", "1.0.0")
    reg.add_crate("serde", "1.0.1", deps=[Dep("serde_derive", "^1", optional=True)])
    reg.add_crate("Inflect", "0.1.0")
    reg.add_crate("meta", "1.0.0+build.7")
    reg.add_crate("big", "1.0.0", pad_to=200_000)
    async with reg:
        yield reg


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def dl(reg: FakeRegistry, name: str, vers: str) -> str:
    return f"{reg.url}/crates/{name}/{vers}/download"


# ---- pure helpers ---------------------------------------------------------------------------------


def test_index_path() -> None:
    assert index_path("a") == "1/a"
    assert index_path("AB") == "2/ab"
    assert index_path("syn") == "3/s/syn"
    assert index_path("serde") == "se/rd/serde"
    assert index_path("Inflector") == "in/fl/inflector"
    assert index_path("a-b_c") == "a-/b_/a-b_c"


def test_tarball_is_real_and_deterministic() -> None:
    deps = [
        Dep("b", "^0.2"),
        Dep("rand", "^0.8", kind="dev"),
        Dep("cc", "^1", kind="build"),
        Dep("libc", "^0.2", target="cfg(unix)"),
        Dep("core2", "^1", optional=True, default_features=False, features=("x",), package="core"),
    ]
    data = make_crate_tarball("foo", "1.2.3", deps)
    assert data == make_crate_tarball("foo", "1.2.3", deps)
    assert data != make_crate_tarball("foo", "1.2.4", deps)
    assert data[:2] == b"\x1f\x8b"
    assert gzip.decompress(data)[:0] == b""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"foo-1.2.3/Cargo.toml", "foo-1.2.3/src/lib.rs"}
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members.values())
        toml_file = tar.extractfile("foo-1.2.3/Cargo.toml")
        lib_file = tar.extractfile("foo-1.2.3/src/lib.rs")
        assert toml_file is not None and lib_file is not None
        manifest = tomllib.loads(toml_file.read().decode())
        lib = lib_file.read().decode()
    assert manifest["package"] == manifest["package"] | {
        "name": "foo",
        "version": "1.2.3",
        "edition": "2021",
    }
    assert manifest["dependencies"]["b"] == {"version": "^0.2"}
    assert manifest["dependencies"]["core2"] == {
        "version": "^1",
        "package": "core",
        "optional": True,
        "default-features": False,
        "features": ["x"],
    }
    assert manifest["dev-dependencies"] == {"rand": {"version": "^0.8"}}
    assert manifest["build-dependencies"] == {"cc": {"version": "^1"}}
    assert manifest["target"]["cfg(unix)"]["dependencies"] == {"libc": {"version": "^0.2"}}
    assert lib == 'pub fn hello() -> &\'static str { "foo 1.2.3" }\n'


def test_tarball_custom_lib_and_padding() -> None:
    data = make_crate_tarball("Big", "0.1.0+x", lib_rs="pub fn f() {}\n", pad_to=2 * 1024 * 1024)
    assert len(data) >= 2 * 1024 * 1024
    assert len(data) < 2 * 1024 * 1024 + 64 * 1024
    assert data == make_crate_tarball("Big", "0.1.0+x", lib_rs="pub fn f() {}\n", pad_to=2 * 1024 * 1024)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = tar.getnames()
        lib_file = tar.extractfile("Big-0.1.0+x/src/lib.rs")
        assert lib_file is not None
        assert lib_file.read() == b"pub fn f() {}\n"
    assert "Big-0.1.0+x/data.bin" in names


def test_index_line_format() -> None:
    reg = FakeRegistry()
    plain = reg.add_crate("Foo", "1.0.0", deps=[Dep("bar", "^1", kind="dev")], features={"std": []})
    assert plain.cksum == sha256(plain.data)
    line = plain.index_line()
    assert b"\n" not in line and b": " not in line and b", " not in line
    assert line == (
        b'{"name":"Foo","vers":"1.0.0","deps":[{"name":"bar","req":"^1","features":[],"optional":false,'
        b'"default_features":true,"target":null,"kind":"dev"}],"cksum":"'
        + plain.cksum.encode()
        + b'","features":{"std":[]},"yanked":false}'
    )
    v2 = reg.add_crate(
        "Foo",
        "1.1.0",
        deps=[Dep("log2", "^0.4", optional=True, package="log")],
        features={"default": ["std"], "std": [], "logging": ["dep:log2"]},
        yanked=True,
    )
    obj = json.loads(v2.index_line())
    assert list(obj) == ["name", "vers", "deps", "cksum", "features", "features2", "yanked", "v"]
    assert obj["features"] == {"default": ["std"], "std": []}
    assert obj["features2"] == {"logging": ["dep:log2"]}
    assert obj["v"] == 2 and obj["yanked"] is True
    assert obj["deps"][0]["package"] == "log"
    assert reg.index_file("foo") == line + b"\n" + v2.index_line() + b"\n"
    assert reg.index_file("FOO") == reg.index_file("Foo")
    with pytest.raises(ValueError):
        reg.add_crate("Foo", "1.0.0")


# ---- index ----------------------------------------------------------------------------------------


async def test_config_and_index_files(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    assert fake.index_url == f"{fake.url}/index/"
    assert fake.url.startswith("http://127.0.0.1:")
    async with session.get(fake.index_url + "config.json") as r:
        assert r.status == 200
        assert await r.json() == {"dl": f"{fake.url}/crates", "api": fake.url}

    async with session.get(fake.index_url + "se/rd/serde") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        assert r.headers["Cache-Control"] == "public,max-age=600"
        assert r.headers["ETag"].startswith('"')
        assert r.headers["Last-Modified"].endswith("GMT")
        body = await r.read()
    assert body == fake.index_file("serde")
    assert body.endswith(b"\n")
    entries = [json.loads(line) for line in body.splitlines()]
    assert [e["vers"] for e in entries] == ["1.0.0", "1.0.1"]
    for entry in entries:
        async with session.get(dl(fake, "serde", entry["vers"])) as r:
            assert r.status == 200
            assert sha256(await r.read()) == entry["cksum"]

    async with session.get(fake.index_url + "in/fl/inflect") as r:
        assert r.status == 200
        assert json.loads(await r.read())["name"] == "Inflect"
    for missing in ("in/fl/Inflect", "no/pe/nope", "se/rd", "serde", "3/s/serde"):
        async with session.get(fake.index_url + missing) as r:
            assert r.status == 404, missing


async def test_index_gzip(fake: FakeRegistry) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(fake.index_url + "se/rd/serde", headers={"Accept-Encoding": "gzip"}) as r:
            assert r.status == 200
            assert r.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(await r.read()) == fake.index_file("serde")
        async with raw.get(fake.index_url + "se/rd/serde", headers={"Accept-Encoding": "identity"}) as r:
            assert "Content-Encoding" not in r.headers
            assert await r.read() == fake.index_file("serde")
        async with raw.get(fake.index_url + "se/rd/serde", headers={"Accept-Encoding": "gzip;q=0"}) as r:
            assert "Content-Encoding" not in r.headers
    # aiohttp's default client asks for gzip and decodes it transparently
    async with aiohttp.ClientSession() as s, s.get(fake.index_url + "se/rd/serde") as r:
        assert r.headers.get("Content-Encoding") == "gzip"
        assert await r.read() == fake.index_file("serde")


async def test_conditional_requests_and_yank(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    url = fake.index_url + "se/rd/serde"
    async with session.get(url) as r:
        etag, last_modified = r.headers["ETag"], r.headers["Last-Modified"]
    async with session.get(url, headers={"If-None-Match": etag}) as r:
        assert r.status == 304
        assert r.headers["ETag"] == etag
        assert await r.read() == b""
    async with session.get(url, headers={"If-None-Match": '"other", ' + etag}) as r:
        assert r.status == 304
    async with session.get(url, headers={"If-None-Match": '"other"'}) as r:
        assert r.status == 200
    async with session.get(url, headers={"If-Modified-Since": last_modified}) as r:
        assert r.status == 304
    async with session.get(url, headers={"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}) as r:
        assert r.status == 200

    fake.set_yanked("serde", "1.0.0", True)
    async with session.get(url, headers={"If-None-Match": etag}) as r:
        assert r.status == 200
        assert r.headers["ETag"] != etag
        assert r.headers["Last-Modified"] != last_modified
        new_etag = r.headers["ETag"]
        lines = [json.loads(x) for x in (await r.read()).splitlines()]
    assert [e["yanked"] for e in lines] == [True, False]
    async with session.get(url, headers={"If-Modified-Since": last_modified}) as r:
        assert r.status == 200
    async with session.get(url, headers={"If-None-Match": new_etag}) as r:
        assert r.status == 304
    # yanked versions stay downloadable
    async with session.get(dl(fake, "serde", "1.0.0")) as r:
        assert r.status == 200

    fake.set_yanked("serde", "1.0.0", False)
    async with session.get(url) as r:
        assert r.headers["ETag"] == etag
        assert await r.read() == fake.index_file("serde")


async def test_remove_crate_and_raw_files(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    fake.remove_crate("serde")
    async with session.get(fake.index_url + "se/rd/serde") as r:
        assert r.status == 404
    with pytest.raises(KeyError):
        fake.index_file("serde")

    real = (REAL_INDEX / "se/rd/serde").read_bytes()
    fake.add_raw_index_file("se/rd/serde", real)
    fake.add_raw_index_file("/index/3/s/syn", b"not even json\n")
    async with session.get(fake.index_url + "se/rd/serde") as r:
        assert r.status == 200
        assert await r.read() == real
        assert r.headers["ETag"]
    async with session.get(fake.index_url + "3/s/syn") as r:
        assert await r.read() == b"not even json\n"
    # the real index's crates are not downloadable here
    first = json.loads(real.splitlines()[0])
    async with session.get(dl(fake, "serde", first["vers"])) as r:
        assert r.status == 403

    custom = b'{"dl":"http://127.0.0.1:9/x","api":null,"auth-required":false}'
    fake.add_raw_index_file("config.json", custom)
    async with session.get(fake.index_url + "config.json") as r:
        assert await r.read() == custom


# ---- crates ---------------------------------------------------------------------------------------


async def test_crate_download(fake: FakeRegistry) -> None:
    cv = fake.get_version("big", "1.0.0")
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        headers = {"Accept-Encoding": "gzip, deflate"}
        async with raw.get(dl(fake, "big", "1.0.0"), headers=headers) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/gzip"
            assert "Content-Encoding" not in r.headers
            assert int(r.headers["Content-Length"]) == len(cv.data)
            body = await r.read()
        assert body == cv.data and sha256(body) == cv.cksum
        assert len(body) > 3 * CHUNK_SIZE

        async with raw.head(dl(fake, "big", "1.0.0")) as r:
            assert r.status == 200
            assert int(r.headers["Content-Length"]) == len(cv.data)
            assert await r.read() == b""
        async with raw.head(dl(fake, "big", "9.9.9")) as r:
            assert r.status == 403

        meta = fake.get_version("meta", "1.0.0+build.7")
        for vers in ("1.0.0+build.7", "1.0.0%2Bbuild.7", "1.0.0%2bbuild.7"):
            async with raw.get(f"{fake.url}/crates/meta/{vers}/download") as r:
                assert r.status == 200, vers
                assert await r.read() == meta.data

        # names are case-sensitive in download URLs; unknown crates -> 403 like static.crates.io
        for path in ("/crates/inflect/0.1.0/download", "/crates/nope/1.0.0/download", "/crates/x", "/"):
            async with raw.get(fake.url + path) as r:
                assert r.status == 403, path
        async with raw.get(dl(fake, "Inflect", "0.1.0")) as r:
            assert r.status == 200

        fake.crate_status_403_for_missing = False
        async with raw.get(dl(fake, "inflect", "0.1.0")) as r:
            assert r.status == 404


@pytest.mark.parametrize(
    ("template", "expected_path"),
    [
        ("{base}/crates", "/crates/Inflect/0.1.0/download"),
        (
            "{base}/files/{lowerprefix}/{crate}/{crate}-{version}.crate",
            "/files/in/fl/Inflect/Inflect-0.1.0.crate",
        ),
        ("{base}/p/{prefix}/{crate}/{version}/dl", "/p/In/fl/Inflect/0.1.0/dl"),
        ("{base}/by-sum/{sha256-checksum}", "/by-sum/{cksum}"),
        ("{base}/q?c={crate}&v={version}", "/q?c=Inflect&v=0.1.0"),
    ],
)
async def test_dl_templates(template: str, expected_path: str, session: aiohttp.ClientSession) -> None:
    reg = FakeRegistry(template)
    cv = reg.add_crate("Inflect", "0.1.0")
    meta = reg.add_crate("meta", "2.0.0+abc")
    async with reg:
        async with session.get(reg.index_url + "config.json") as r:
            config = await r.json()
        assert config["dl"] == template.replace("{base}", reg.url)
        assert config["api"] == reg.url
        url = reg.url + expected_path.replace("{cksum}", cv.cksum)
        assert reg.download_url(cv) == url
        async with session.get(url) as r:
            assert r.status == 200
            assert await r.read() == cv.data
        async with session.get(reg.download_url(meta).replace("+", "%2B")) as r:
            assert r.status == 200
            assert await r.read() == meta.data
        # always also at the crates.io API path
        async with session.get(dl(reg, "Inflect", "0.1.0")) as r:
            assert await r.read() == cv.data
        if "{crate}" in template or "{" not in template.removeprefix("{base}"):
            async with session.get(url.replace("Inflect", "inflect")) as r:
                assert r.status == 403


# ---- faults ---------------------------------------------------------------------------------------


async def test_down(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    fake.down = True
    for url in (fake.index_url + "config.json", fake.index_url + "se/rd/serde", dl(fake, "serde", "1.0.0")):
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(url) as r:
                await r.read()
    assert fake.count("/index/config.json") >= 1
    assert fake.count("/crates/serde/1.0.0/download") >= 1
    fake.down = False
    async with session.get(fake.index_url + "config.json") as r:
        assert r.status == 200


async def test_delay(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    fake.delay = 0.3
    start = time.monotonic()
    async with session.get(fake.index_url + "se/rd/serde") as r:
        assert r.status == 200
    assert time.monotonic() - start >= 0.25
    fake.delay = 0
    start = time.monotonic()
    async with session.get(fake.index_url + "se/rd/serde") as r:
        assert r.status == 200
    assert time.monotonic() - start < 0.25


async def test_status_override(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    fake.status_override = 503
    for url in (fake.index_url + "se/rd/serde", dl(fake, "serde", "1.0.0"), fake.index_url + "config.json"):
        async with session.get(url) as r:
            assert r.status == 503
            assert "Retry-After" not in r.headers
            assert await r.read()
    fake.status_override = 429
    fake.retry_after = "2"
    async with session.get(fake.index_url + "se/rd/serde") as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "2"
    fake.status_override = None
    async with session.get(fake.index_url + "se/rd/serde") as r:
        assert r.status == 200
        assert "Retry-After" not in r.headers


async def test_fail_every_other(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    fake.fail_every_other = 503
    urls = [fake.index_url + "se/rd/serde", dl(fake, "serde", "1.0.0")] * 3
    statuses = []
    for url in urls:
        async with session.get(url) as r:
            statuses.append(r.status)
    assert statuses == [503, 200, 503, 200, 503, 200]
    fake.fail_every_other = 500  # re-arming restarts the alternation: the next request fails
    async with session.get(urls[0]) as r:
        assert r.status == 500
    fake.fail_every_other = None
    for url in urls[:2]:
        async with session.get(url) as r:
            assert r.status == 200


async def test_corrupt_crates(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    cv = fake.get_version("serde", "1.0.0")
    fake.corrupt_crates = True
    async with session.get(dl(fake, "serde", "1.0.0")) as r:
        assert r.status == 200
        body = await r.read()
    assert len(body) == len(cv.data)
    assert sha256(body) != cv.cksum
    assert sum(a != b for a, b in zip(body, cv.data, strict=True)) == 1
    fake.corrupt_crates = False
    async with session.get(dl(fake, "serde", "1.0.0")) as r:
        assert sha256(await r.read()) == cv.cksum


async def test_stall_after_bytes_until_cleared(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    cv = fake.get_version("big", "1.0.0")
    fake.stall_after_bytes = 20_000
    async with session.get(dl(fake, "big", "1.0.0")) as r:
        assert r.status == 200
        assert int(r.headers["Content-Length"]) == len(cv.data)
        head = await asyncio.wait_for(r.content.readexactly(20_000), timeout=10)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(r.content.read(1), timeout=0.3)  # client read timeout
        fake.stall_after_bytes = None
        rest = await asyncio.wait_for(r.content.read(), timeout=10)
    assert sha256(head + rest) == cv.cksum

    # a client-side read timeout (as a mirror would use) fires on a stall
    fake.stall_after_bytes = 0
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    with pytest.raises(asyncio.TimeoutError):
        async with session.get(dl(fake, "big", "1.0.0"), timeout=timeout) as r:
            await r.read()
    fake.stall_after_bytes = None


async def test_stop_does_not_hang_on_stall_or_gate(session: aiohttp.ClientSession) -> None:
    reg = FakeRegistry()
    reg.add_crate("big", "1.0.0", pad_to=100_000)
    reg.add_crate("small", "1.0.0")
    await reg.start()
    reg.stall_after_bytes = 5_000
    resp = await session.get(dl(reg, "big", "1.0.0"))
    await resp.content.readexactly(5_000)
    reg.gate = asyncio.Event()
    gated = asyncio.create_task(session.get(dl(reg, "small", "1.0.0")))
    await reg.hold_started.wait()
    await asyncio.wait_for(reg.stop(), timeout=10)
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(resp.read(), timeout=10)
    resp.release()
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(gated, timeout=10)


async def test_body_chunk_delay(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    cv = fake.get_version("big", "1.0.0")
    chunks = -(-len(cv.data) // CHUNK_SIZE)
    fake.body_chunk_delay = 0.05
    start = time.monotonic()
    async with session.get(dl(fake, "big", "1.0.0")) as r:
        body = await r.read()
    assert time.monotonic() - start >= 0.05 * (chunks - 1) * 0.8
    assert sha256(body) == cv.cksum


async def test_gate_and_hold_started(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    cv = fake.get_version("serde", "1.0.0")
    fake.gate = gate = asyncio.Event()

    async def fetch() -> bytes:
        async with session.get(dl(fake, "serde", "1.0.0")) as r:
            assert r.status == 200
            return await r.read()

    tasks = []
    for n in range(1, 4):
        fake.hold_started.clear()
        tasks.append(asyncio.create_task(fetch()))
        await asyncio.wait_for(fake.hold_started.wait(), timeout=10)
        assert fake.held == n
    assert fake.count("/crates/serde/1.0.0/download") == 3
    assert not any(t.done() for t in tasks)
    # index requests and HEADs are not gated
    async with session.get(fake.index_url + "se/rd/serde") as r:
        assert r.status == 200
    async with session.head(dl(fake, "serde", "1.0.0")) as r:
        assert r.status == 200
    gate.set()
    bodies = await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    assert all(b == cv.data for b in bodies)
    assert fake.held == 0

    # clearing the gate attribute also releases parked requests
    fake.gate = asyncio.Event()
    fake.hold_started.clear()
    task = asyncio.create_task(fetch())
    await asyncio.wait_for(fake.hold_started.wait(), timeout=10)
    fake.gate = None
    assert await asyncio.wait_for(task, timeout=10) == cv.data


async def test_counts_and_request_log(fake: FakeRegistry, session: aiohttp.ClientSession) -> None:
    async with session.get(fake.index_url + "se/rd/serde", headers={"User-Agent": "probe/1"}) as r:
        etag = r.headers["ETag"]
    async with session.get(fake.index_url + "se/rd/serde", headers={"If-None-Match": etag}) as r:
        assert r.status == 304
    async with session.head(dl(fake, "serde", "1.0.0")) as r:
        pass
    async with session.get(dl(fake, "nope", "1.0.0")) as r:
        assert r.status == 403
    async with session.get(fake.url + "/crates/meta/1.0.0%2Bbuild.7/download?x=1") as r:
        assert r.status == 200

    assert fake.requests["/index/se/rd/serde"] == 2
    assert fake.requests["/crates/serde/1.0.0/download"] == 1
    assert fake.requests["/crates/nope/1.0.0/download"] == 1
    assert fake.requests["/crates/meta/1.0.0%2Bbuild.7/download"] == 1  # raw path, no query
    assert fake.count("/index/") == 2
    assert fake.count("/download") == 3
    assert fake.count("serde") == 3

    methods = [(m, p) for m, p, _ in fake.request_log]
    assert methods[:3] == [
        ("GET", "/index/se/rd/serde"),
        ("GET", "/index/se/rd/serde"),
        ("HEAD", "/crates/serde/1.0.0/download"),
    ]
    first_headers, second_headers = fake.request_log[0][2], fake.request_log[1][2]
    assert first_headers["User-Agent"] == "probe/1"
    assert first_headers.get("user-agent") == "probe/1"
    assert "If-None-Match" not in first_headers
    assert second_headers["If-None-Match"] == etag

    fake.reset_counts()
    assert fake.count("/") == 0 and fake.request_log == []


# ---- the real cargo, straight against the fake ---------------------------------------------------


@pytest.mark.parametrize(
    "dl_template",
    [None, "{base}/files/{prefix}/{lowerprefix}/{crate}/{version}/{sha256-checksum}/{crate}-{version}.crate"],
    ids=["default-dl", "marker-dl"],
)
async def test_real_cargo_end_to_end(tmp_path: Path, dl_template: str | None) -> None:
    reg = FakeRegistry(dl_template)
    publish_small_tree(reg)
    expected = SMALL_TREE_RESOLVED

    home, project = tmp_path / "cargo-home", tmp_path / "app"
    async with reg:
        write_cargo_home(home, reg.index_url, source_name="fake")
        write_cargo_project(project, SMALL_TREE_DEPS)
        for args in (["generate-lockfile"], ["fetch"], ["build", "--offline"]):
            code, output = await run_cargo(args, project, home)
            assert code == 0, f"cargo {' '.join(args)} failed:\n{output}"

    lock = tomllib.loads((project / "Cargo.lock").read_text())
    packages = {p["name"]: p for p in lock["package"] if p["name"] != "app"}
    assert {name: p["version"] for name, p in packages.items()} == expected
    for name, vers in expected.items():
        assert packages[name]["source"] == CRATES_IO_SOURCE
        assert packages[name]["checksum"] == reg.get_version(name, vers).cksum
    assert (project / "target" / "debug" / "app").exists()

    assert reg.count("/index/config.json") >= 1
    assert reg.count("/index/in/fl/inflect") >= 1
    assert reg.count("/index/1/z") >= 1 and reg.count("/index/3/o/opt") >= 1
    for name, vers in expected.items():
        cv = reg.get_version(name, vers)
        assert reg.count(urlsplit(reg.download_url(cv)).path) == 1, (name, dict(reg.requests))
    assert reg.count("1.2.0") == 0
    user_agents = {headers.get("User-Agent", "") for _, _, headers in reg.request_log}
    assert all(ua.startswith("cargo/") for ua in user_agents), user_agents
