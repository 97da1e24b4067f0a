"""Toolchain files shared through the bucket (storage.backend s3, moto's real S3 server): a component one
replica fetched and verified is taken by another from the bucket, authenticated and hashed against its
own verified manifest; an object in the bucket that does not authenticate is ignored and replaced."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.dist_server import DistServer, TestSigningKey, build_release, have_gpg
from tests.fleet_support import MotoS3, replicas
from tests.mirror_process import wait_until

pytestmark = [
    pytest.mark.fleet,
    pytest.mark.skipif(not have_gpg(), reason="gpg/gpgv (GnuPG) is not installed"),
]

STABLE = "dist/channel-rust-stable.toml"
RUSTC = "dist/2026-01-01/rustc-1.90.0-x86_64-unknown-linux-gnu.tar.gz"


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with session.get(url) as response:
        return response.status, response.headers.get("X-Cache", ""), await response.read()


async def test_a_component_one_replica_verified_is_taken_from_the_bucket_by_another(
    moto: MotoS3, tmp_path: Path
) -> None:
    key = await asyncio.to_thread(TestSigningKey, tmp_path / "gnupg")
    release = build_release("stable", "1.90.0", "2026-01-01")
    async with DistServer(key) as dist:
        dist.publish(release)
        toolchains = f"toolchains:\n  upstream: {dist.url}\n  signing_key: {key.public_key}\n"
        async with (
            replicas("http://127.0.0.1:9/index/", tmp_path, 3, config_text=moto.yaml() + toolchains) as (
                a,
                b,
                c,
            ),
            aiohttp.ClientSession() as session,
        ):
            assert await get(session, f"{a.url}/toolchains/{RUSTC}") == (200, "MISS", release.files[RUSTC])

            async def uploaded() -> bool:
                return f"toolchains/{RUSTC}" in await asyncio.to_thread(moto.object_keys)

            await wait_until(uploaded, "the component in the bucket", timeout=20, interval=0.05)
            assert await get(session, f"{b.url}/toolchains/{RUSTC}") == (200, "HIT", release.files[RUSTC])
            assert dist.requests[RUSTC] == 1
            # An object put there without the fleet's secret (someone with write access to the bucket):
            # ignored, and the component comes from upstream, verified, and replaces it.
            client = moto.client()
            await asyncio.to_thread(
                client.put_object, Bucket=moto.bucket, Key=f"toolchains/{RUSTC}", Body=b"evil",
                Metadata={"sha256": "0" * 64},
            )  # fmt: skip
            assert await get(session, f"{c.url}/toolchains/{RUSTC}") == (200, "MISS", release.files[RUSTC])
            assert dist.requests[RUSTC] == 2
