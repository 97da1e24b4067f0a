"""The toolchain service through the mirror's routes (in-process app) against a fake dist server:
path parsing, manifest signatures, computed .sha256, components named by a verified manifest, Range,
negative caching, rustup-init against its .sha256, and the routes being open with auth.required."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from cratemirror.cache.toolchains.manifest import BadManifest, parse_manifest
from cratemirror.cache.toolchains.paths import Kind, UnknownToolchainPath, parse_toolchain_path
from cratemirror.cache.toolchains.signature import BadSignature, SignatureVerifier
from cratemirror.http.app import create_app
from cratemirror.names import InvalidRequest
from tests.conftest import make_config
from tests.dist_server import DistServer, TestSigningKey, build_release, have_gpg, publish_rustup_init
from tests.mirror_process import wait_until

needs_gpg = pytest.mark.skipif(not have_gpg(), reason="gpg/gpgv (GnuPG) is not installed")

STABLE = "dist/channel-rust-stable.toml"
RUSTC = "dist/2026-01-01/rustc-1.90.0-x86_64-unknown-linux-gnu.tar.gz"


# --- paths --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kind", "moving"),
    [
        ("dist/channel-rust-stable.toml", Kind.MANIFEST, True),
        ("dist/channel-rust-nightly.toml.sha256", Kind.MANIFEST_SHA256, True),
        ("dist/channel-rust-1.79.toml.asc", Kind.MANIFEST_ASC, True),
        ("dist/channel-rust-1.79.0.toml", Kind.MANIFEST, False),
        ("dist/2024-06-13/channel-rust-nightly.toml", Kind.MANIFEST, False),
        ("dist/2024-06-13/rust-std-1.79.0-x86_64-unknown-linux-gnu.tar.xz", Kind.COMPONENT, False),
        ("dist/2024-06-13/rust-src-1.79.0.tar.zst", Kind.COMPONENT, False),
        ("dist/2024-06-13/rustc-nightly-aarch64-apple-darwin.tar.gz", Kind.COMPONENT, False),
        ("rustup/release-stable.toml", Kind.RUSTUP_RELEASE, True),
        ("rustup/dist/x86_64-unknown-linux-gnu/rustup-init", Kind.RUSTUP_INIT, True),
        ("rustup/dist/x86_64-pc-windows-msvc/rustup-init.exe.sha256", Kind.RUSTUP_INIT_SHA256, True),
        ("rustup/archive/1.27.1/x86_64-unknown-linux-gnu/rustup-init", Kind.RUSTUP_INIT, False),
    ],
)
def test_paths_rustup_asks_for(path: str, kind: Kind, moving: bool) -> None:
    parsed = parse_toolchain_path(path)
    assert (parsed.path, parsed.kind, parsed.moving) == (path, kind, moving)


@pytest.mark.parametrize(
    "path",
    [
        "dist/../etc/passwd",
        "dist/channel-rust-stable.toml/..",
        "dist/channel-rust-main.toml",
        "dist/channel-rust-01.79.toml",
        "dist/2024-06-13/../../x.tar.gz",
        "dist/2024-06-13/.hidden.tar.gz",
        "dist/2024-06-13/rustc.sh",
        "dist/2024-6-13/rustc-1.0.0-x.tar.gz",
        "rustup/dist/x86_64-unknown-linux-gnu/other",
        "rustup/archive/latest/x86_64-unknown-linux-gnu/rustup-init",
        "",
        "/dist/channel-rust-stable.toml",
    ],
)
def test_other_paths_are_refused(path: str) -> None:
    with pytest.raises(UnknownToolchainPath):
        parse_toolchain_path(path)


@pytest.mark.parametrize("path", ["dist/2024-02-30/channel-rust-nightly.toml", "dist/é", "dist/" + "a" * 400])
def test_malformed_paths_are_400(path: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_toolchain_path(path)
    assert not isinstance(caught.value, UnknownToolchainPath)


def test_manifest_hashes_keep_only_static_rust_lang_org_component_urls() -> None:
    release = build_release("stable", "1.90.0", "2026-01-01")
    hashes = parse_manifest(release.manifest, STABLE)
    assert hashes.date == "2026-01-01"
    assert hashes.hashes[RUSTC] == hashlib.sha256(release.files[RUSTC]).hexdigest()
    odd = release.manifest.replace(b"https://static.rust-lang.org/dist", b"https://evil.example/dist")
    assert parse_manifest(odd, STABLE).hashes == {}
    with pytest.raises(BadManifest):
        parse_manifest(b"manifest-version = '1'\n", STABLE)
    with pytest.raises(BadManifest):
        parse_manifest(b"\xff\xfe", STABLE)


# --- signatures -----------------------------------------------------------------------------------------


@pytest.fixture
async def key(tmp_path: Path) -> TestSigningKey:
    if not have_gpg():
        pytest.skip("gpg/gpgv (GnuPG) is not installed")
    return await asyncio.to_thread(TestSigningKey, tmp_path / "gnupg")


async def test_gpgv_accepts_only_the_configured_key(key: TestSigningKey, tmp_path: Path) -> None:
    verifier = SignatureVerifier(key.public_key)
    try:
        await verifier.verify(b"manifest", key.sign(b"manifest"), STABLE)
        with pytest.raises(BadSignature, match=str(key.public_key)):
            await verifier.verify(b"manifest!", key.sign(b"manifest"), STABLE)
        other = await asyncio.to_thread(TestSigningKey, tmp_path / "other")
        with pytest.raises(BadSignature, match="does not verify"):
            await verifier.verify(b"manifest", other.sign(b"manifest"), STABLE)
        with pytest.raises(BadSignature):
            await verifier.verify(b"manifest", b"not a signature", STABLE)
    finally:
        verifier.close()


@needs_gpg
async def test_the_shipped_rust_release_key_is_the_default() -> None:
    verifier = SignatureVerifier(None)
    try:
        keyring = await verifier._keyring_path()
        listing = await asyncio.create_subprocess_exec(
            "gpg", "--homedir", str(keyring.parent), "--with-colons", "--show-keys", str(keyring),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        out, _ = await listing.communicate()
        assert b"108F66205EAEB0AAA8DD5E1C85AB96E6FA1BE5FE" in out
    finally:
        verifier.close()


# --- the service through the routes ---------------------------------------------------------------------


@pytest.fixture
async def dist(key: TestSigningKey) -> AsyncIterator[DistServer]:
    async with DistServer(key) as server:
        server.publish(build_release("stable", "1.90.0", "2026-01-01"))
        yield server


@pytest.fixture
async def mirror(
    aiohttp_client: Any, tmp_path: Path, dist: DistServer, key: TestSigningKey
) -> TestClient[Any, Any]:
    config = make_config(
        "http://127.0.0.1:9/index/", tmp_path / "cache",
        toolchains__upstream=dist.url, toolchains__signing_key=key.public_key,
    )  # fmt: skip
    client: TestClient[Any, Any] = await aiohttp_client(create_app(config))
    return client


async def test_manifest_byte_for_byte_and_sha256_from_the_bytes_served(
    mirror: TestClient[Any, Any], dist: DistServer
) -> None:
    answer = await mirror.get(f"/toolchains/{STABLE}")
    assert answer.status == 200 and answer.headers["X-Cache"] == "MISS"
    body = await answer.read()
    assert body == dist.files[STABLE]
    answer = await mirror.get(f"/toolchains/{STABLE}.sha256")
    assert (await answer.text()).split()[0] == hashlib.sha256(body).hexdigest()
    answer = await mirror.get(f"/toolchains/{STABLE}.asc")
    assert await answer.read() == dist.files[f"{STABLE}.asc"]
    assert dist.requests[STABLE] == 1  # the .sha256 and .asc came from the verified copy
    metrics = await (await mirror.get("/metrics")).text()
    series = 'cratemirror_upstream_requests_total{kind="toolchain",registry="crates-io",status="200"}'
    assert series in metrics


async def test_upstream_404s_are_remembered(mirror: TestClient[Any, Any], dist: DistServer) -> None:
    for _ in range(3):
        answer = await mirror.get("/toolchains/dist/2026-01-07/channel-rust-nightly.toml")
        assert answer.status == 404
    assert dist.requests["dist/2026-01-07/channel-rust-nightly.toml"] == 1


async def test_a_component_no_manifest_names_is_404_without_fetching_it(
    mirror: TestClient[Any, Any], dist: DistServer
) -> None:
    dist.files["dist/2026-01-01/evil-1.0.0-x86_64-unknown-linux-gnu.tar.gz"] = b"x"
    answer = await mirror.get("/toolchains/dist/2026-01-01/evil-1.0.0-x86_64-unknown-linux-gnu.tar.gz")
    assert answer.status == 404
    assert "not named by any verified channel manifest" in await answer.text()
    assert dist.requests["dist/2026-01-01/evil-1.0.0-x86_64-unknown-linux-gnu.tar.gz"] == 0


async def test_a_component_first_asked_fetches_its_dated_manifest_then_ranges(
    mirror: TestClient[Any, Any], dist: DistServer
) -> None:
    answer = await mirror.get(f"/toolchains/{RUSTC}")
    assert answer.status == 200
    assert await answer.read() == dist.files[RUSTC]
    assert dist.requests["dist/2026-01-01/channel-rust-stable.toml"] == 1
    answer = await mirror.get(f"/toolchains/{RUSTC}", headers={"Range": "bytes=100-"})
    assert answer.status == 206
    size = len(dist.files[RUSTC])
    assert answer.headers["Content-Range"] == f"bytes 100-{size - 1}/{size}"
    assert await answer.read() == dist.files[RUSTC][100:]
    answer = await mirror.get(f"/toolchains/{RUSTC}", headers={"Range": f"bytes={size}-"})
    assert answer.status == 416
    answer = await mirror.head(f"/toolchains/{RUSTC}")
    assert answer.status == 200 and answer.headers["X-Cache"] == "HIT"
    assert dist.requests[RUSTC] == 1


async def test_concurrent_asks_for_a_component_are_one_upstream_fetch(
    mirror: TestClient[Any, Any], dist: DistServer
) -> None:
    await mirror.get(f"/toolchains/{STABLE}")
    dist.delay = 0.2
    answers = await asyncio.gather(*(mirror.get(f"/toolchains/{RUSTC}") for _ in range(5)))
    assert [answer.status for answer in answers] == [200] * 5
    assert all([await answer.read() == dist.files[RUSTC] for answer in answers])
    assert dist.requests[RUSTC] == 1


async def test_rustup_init_is_checked_against_upstreams_sha256(
    mirror: TestClient[Any, Any], dist: DistServer
) -> None:
    publish_rustup_init(dist, "1.29.0", b"#!/bin/sh\necho rustup-init\n")
    good = "rustup/archive/1.29.0/x86_64-unknown-linux-gnu/rustup-init"
    answer = await mirror.get(f"/toolchains/{good}")
    assert answer.status == 200 and await answer.read() == b"#!/bin/sh\necho rustup-init\n"
    answer = await mirror.get("/toolchains/rustup/release-stable.toml")
    assert b'version = "1.29.0"' in await answer.read()
    bad = "rustup/dist/x86_64-unknown-linux-gnu/rustup-init"
    dist.override[bad] = b"#!/bin/sh\necho tampered\n"
    answer = await mirror.get(f"/toolchains/{bad}")
    assert answer.status == 502
    answer = await mirror.get(f"/toolchains/{bad}")  # not stored: asked again, still refused
    assert answer.status == 502
    assert dist.requests[bad] == 2


async def test_bad_paths_and_methods(mirror: TestClient[Any, Any]) -> None:
    assert (await mirror.get("/toolchains/dist/channel-rust-main.toml")).status == 404
    assert (await mirror.get("/toolchains/dist/2026-13-01/channel-rust-nightly.toml")).status == 400
    assert (await mirror.post(f"/toolchains/{STABLE}")).status == 405


async def test_open_with_auth_required_and_off_when_upstream_is_null(
    aiohttp_client: Any, tmp_path: Path, dist: DistServer, key: TestSigningKey
) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens: []\n")
    config = make_config(
        "http://127.0.0.1:9/index/", tmp_path / "cache",
        toolchains__upstream=dist.url, toolchains__signing_key=key.public_key,
        auth__required=True, auth__tokens_file=tokens,
    )  # fmt: skip
    client = await aiohttp_client(create_app(config))
    assert (await client.get(f"/toolchains/{STABLE}")).status == 200
    assert (await client.get("/index/config.json")).status == 401
    config = make_config("http://127.0.0.1:9/index/", tmp_path / "cache2", toolchains__upstream=None)
    client = await aiohttp_client(create_app(config))
    answer = await client.get(f"/toolchains/{STABLE}")
    assert answer.status == 404 and "toolchains.upstream is null" in await answer.text()
    assert not (tmp_path / "cache2" / "toolchains").exists()


async def test_components_beyond_max_size_are_evicted_least_recently_used_first(
    aiohttp_client: Any, tmp_path: Path, dist: DistServer, key: TestSigningKey
) -> None:
    release = build_release("stable", "1.90.0", "2026-01-01")
    rustc, cargo = sorted(release.files)[1], sorted(release.files)[0]
    assert "rustc-" in rustc and "cargo-" in cargo
    config = make_config(
        "http://127.0.0.1:9/index/", tmp_path / "cache",
        toolchains__upstream=dist.url, toolchains__signing_key=key.public_key,
        toolchains__max_size=len(release.files[rustc]) + len(release.files[cargo]) - 1,
    )  # fmt: skip
    client = await aiohttp_client(create_app(config))
    stored = tmp_path / "cache" / "toolchains" / "files"
    answer = await client.get(f"/toolchains/{rustc}")
    assert answer.status == 200, await answer.text()
    assert (stored / rustc).exists()
    answer = await client.get(f"/toolchains/{cargo}")
    assert answer.status == 200, await answer.text()

    async def rustc_evicted() -> bool:
        return not (stored / rustc).exists()

    await wait_until(rustc_evicted, "the least recently used component to be evicted", timeout=5)
    assert (stored / cargo).exists()
    dated = stored / "dist/2026-01-01/channel-rust-stable.toml"

    async def manifest_stored() -> bool:
        return dated.exists()

    await wait_until(manifest_stored, "the dated manifest to be stored", timeout=5)  # and never evicted
    size = len(release.files[cargo])  # what toolchains.max_size bounds: components, not manifests
    gauge = f'cratemirror_cache_size_bytes{{kind="toolchain",registry="crates-io"}} {float(size)}'

    async def gauge_updated() -> bool:
        return gauge in await (await client.get("/metrics")).text()

    await wait_until(gauge_updated, "the toolchain size gauge to follow the eviction", timeout=5)


async def test_a_large_component_streams_and_is_cut_before_its_last_byte_on_a_mismatch(
    aiohttp_client: Any, tmp_path: Path, dist: DistServer, key: TestSigningKey
) -> None:
    large = build_release("stable", "1.91.0", "2026-02-01", padding=5 * 1024 * 1024)
    dist.publish(large)
    rustc = next(path for path in large.files if "rustc-" in path)
    assert len(large.files[rustc]) > 4 * 1024 * 1024  # over VERIFY_BEFORE_SENDING: streamed
    config = make_config(
        "http://127.0.0.1:9/index/", tmp_path / "cache",
        toolchains__upstream=dist.url, toolchains__signing_key=key.public_key,
    )  # fmt: skip
    client = await aiohttp_client(create_app(config))
    assert (await client.get(f"/toolchains/{STABLE}")).status == 200
    dist.override[rustc] = large.files[rustc][:-1] + bytes([large.files[rustc][-1] ^ 1])
    answer = await client.get(f"/toolchains/{rustc}")
    assert answer.status == 200 and answer.headers["X-Cache"] == "MISS"
    with pytest.raises(aiohttp.ClientPayloadError):
        await answer.read()
    assert not (tmp_path / "cache" / "toolchains" / "files" / rustc).exists()
    del dist.override[rustc]
    answer = await client.get(f"/toolchains/{rustc}")
    assert await answer.read() == large.files[rustc]  # the last chunk may go out before it is stored
    stored = tmp_path / "cache" / "toolchains" / "files" / rustc

    async def is_stored() -> bool:
        return stored.exists()

    await wait_until(is_stored, "the verified component to be stored", timeout=10)
    assert stored.read_bytes() == large.files[rustc]


async def test_a_new_rustup_init_replaces_the_cached_one_after_the_ttl(
    aiohttp_client: Any, tmp_path: Path, dist: DistServer, key: TestSigningKey
) -> None:
    config = make_config(
        "http://127.0.0.1:9/index/", tmp_path / "cache",
        toolchains__upstream=dist.url, toolchains__signing_key=key.public_key, toolchains__manifest_ttl=0.3,
    )  # fmt: skip
    client = await aiohttp_client(create_app(config))
    path = "/toolchains/rustup/dist/x86_64-unknown-linux-gnu/rustup-init"
    publish_rustup_init(dist, "1.29.0", b"old rustup-init\n")
    assert await (await client.get(path)).read() == b"old rustup-init\n"
    publish_rustup_init(dist, "1.30.0", b"new rustup-init\n")
    assert await (await client.get(path)).read() == b"old rustup-init\n"  # within the TTL
    await asyncio.sleep(0.4)  # the TTL itself is under test: no event marks its end
    answer = await client.get(path)
    assert await answer.read() == b"new rustup-init\n"
    digest = (await (await client.get(f"{path}.sha256")).text()).split()[0]
    assert digest == hashlib.sha256(b"new rustup-init\n").hexdigest()


async def test_past_the_ttl_the_cached_manifest_answers_while_it_is_revalidated(
    aiohttp_client: Any, tmp_path: Path, dist: DistServer, key: TestSigningKey
) -> None:
    config = make_config(
        "http://127.0.0.1:9/index/", tmp_path / "cache",
        toolchains__upstream=dist.url, toolchains__signing_key=key.public_key, toolchains__manifest_ttl=0.2,
        cache__stale_while_revalidate=60,
    )  # fmt: skip
    client = await aiohttp_client(create_app(config))
    assert b"1.90.0" in await (await client.get(f"/toolchains/{STABLE}")).read()
    dist.publish(build_release("stable", "1.91.0", "2026-02-01"))
    await asyncio.sleep(0.3)  # past the TTL (no event marks its end)
    answer = await client.get(f"/toolchains/{STABLE}")
    assert answer.headers["X-Cache"] == "STALE" and b"1.90.0" in await answer.read()

    async def revalidated() -> bool:
        return b"1.91.0" in await (await client.get(f"/toolchains/{STABLE}")).read()

    await wait_until(revalidated, "the revalidation behind the stale answer", timeout=5)


async def test_a_signed_manifest_that_is_no_channel_manifest_is_refused_and_not_stored(
    mirror: TestClient[Any, Any], dist: DistServer, key: TestSigningKey, tmp_path: Path
) -> None:
    garbage = b"this is [not toml\n"
    dist.override[STABLE] = garbage
    dist.override[f"{STABLE}.asc"] = key.sign(garbage)
    answer = await mirror.get(f"/toolchains/{STABLE}")
    assert answer.status == 502
    assert "not a TOML channel manifest" in await answer.text()
    assert not (tmp_path / "cache" / "toolchains" / "files" / STABLE).exists()
    del dist.override[f"{STABLE}.asc"]
    dist.files.pop(f"{STABLE}.asc")
    dist.override.pop(STABLE)
    answer = await mirror.get(f"/toolchains/{STABLE}")  # no signature published at all
    assert answer.status == 502
    assert "publishes no signature" in await answer.text()
