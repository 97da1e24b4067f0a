"""Toolchains in bundles: what import refuses (a manifest that does not verify, a component whose bytes
are not its manifest's, a member path that is no toolchain file) and that nothing refused is stored."""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from cratemirror.http.app import create_app
from cratemirror.tools.toolchain_bundle import INDEX, MEMBER, export_toolchains, import_toolchains
from tests.conftest import make_config
from tests.dist_server import DistServer, TestSigningKey, build_release, have_gpg
from tests.tools_support import run_cli

pytestmark = pytest.mark.skipif(not have_gpg(), reason="gpg/gpgv (GnuPG) is not installed")

STABLE = "dist/channel-rust-stable.toml"
RUSTC = "dist/2026-01-01/rustc-1.90.0-x86_64-unknown-linux-gnu.tar.gz"


def rewrite(inner: Path, changes: dict[str, bytes]) -> bytes:
    """The inner toolchains.tar with some members' bytes replaced (or added)."""
    out = io.BytesIO()
    with tarfile.open(inner) as source, tarfile.open(fileobj=out, mode="w") as target:
        names = [member.name for member in source.getmembers()]
        for name in [*names, *(name for name in changes if name not in names)]:
            body = changes.get(name)
            if body is None:
                handle = source.extractfile(name)
                assert handle is not None
                body = handle.read()
            info = tarfile.TarInfo(name)
            info.size = len(body)
            target.addfile(info, io.BytesIO(body))
    return out.getvalue()


def outer_bundle(path: Path, inner: bytes) -> Path:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(MEMBER)
        info.size = len(inner)
        tar.addfile(info, io.BytesIO(inner))
    return path


async def test_import_refuses_what_does_not_verify_and_stores_nothing_of_it(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    key = await asyncio.to_thread(TestSigningKey, tmp_path / "gnupg")
    async with DistServer(key) as dist:
        dist.publish(build_release("stable", "1.90.0", "2026-01-01"))
        config = make_config(
            "http://127.0.0.1:9/index/", tmp_path / "a",
            toolchains__upstream=dist.url, toolchains__signing_key=key.public_key,
        )  # fmt: skip
        client = await aiohttp_client(create_app(config))
        assert (await client.get(f"/toolchains/{STABLE}")).status == 200
        assert (await client.get(f"/toolchains/{RUSTC}")).status == 200
        await client.close()  # the manifest is stored behind its answer: shutting down waits for it
    inner = tmp_path / "inner.tar"
    counts = export_toolchains(config, ["stable"], inner)
    assert (counts.files, counts.problems) == (3, [])
    other = await asyncio.to_thread(TestSigningKey, tmp_path / "other")
    manifest = dist.files[STABLE]
    cases = {
        "tampered": ({RUSTC: dist.files[RUSTC][:-1] + b"x"}, [f"{RUSTC}: does not hash"], False),
        "other key": (
            {f"{STABLE}.asc": other.sign(manifest)},
            [f"{STABLE}: the signature does not verify"],
            True,
        ),
        "stray path": ({"../../etc/x.tar.gz": b"x", INDEX: b"{}"}, ["not a toolchain file path"], False),
    }
    for name, (changes, expected, manifest_refused) in cases.items():
        target = make_config(
            "http://127.0.0.1:9/index/", tmp_path / f"b-{name}", toolchains__signing_key=key.public_key
        )
        bundle = outer_bundle(tmp_path / f"{name}.tar", rewrite(inner, changes))
        with tarfile.open(bundle) as tar:
            result = await asyncio.to_thread(import_toolchains, target, tar, tar.getmember(MEMBER))
        for line in expected:
            assert any(line in refused for refused in result.refused), (name, result.refused)
        stored = tmp_path / f"b-{name}" / "toolchains" / "files"
        assert not (stored / RUSTC).exists() or name == "stray path", name
        assert (stored / STABLE).exists() != manifest_refused, name
        assert not list((tmp_path / f"b-{name}").rglob("x.tar.gz"))


async def test_verify_finds_a_corrupt_component_and_a_manifest_that_no_longer_verifies(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    key = await asyncio.to_thread(TestSigningKey, tmp_path / "gnupg")
    async with DistServer(key) as dist:
        dist.publish(build_release("stable", "1.90.0", "2026-01-01"))
        config = make_config(
            "http://127.0.0.1:9/index/", tmp_path / "cache",
            toolchains__upstream=dist.url, toolchains__signing_key=key.public_key,
        )  # fmt: skip
        client = await aiohttp_client(create_app(config))
        assert (await client.get(f"/toolchains/{STABLE}")).status == 200
        assert (await client.get(f"/toolchains/{RUSTC}")).status == 200
        await client.close()
    (tmp_path / "mirror.yaml").write_text(
        f"cache:\n  dir: {tmp_path / 'cache'}\ntoolchains:\n  signing_key: {key.public_key}\n"
    )
    result = await run_cli("verify", "--config", str(tmp_path / "mirror.yaml"), cwd=tmp_path)
    assert result.code == 0, result.stdout + result.stderr
    assert "verify [toolchains]: 2 toolchain files checked: 2 ok, 0 bad" in result.stdout
    files = tmp_path / "cache" / "toolchains" / "files"
    (files / RUSTC).write_bytes(b"rot")
    (files / STABLE).write_bytes((files / STABLE).read_bytes() + b"\n# edited\n")
    result = await run_cli("verify", "--config", str(tmp_path / "mirror.yaml"), cwd=tmp_path)
    assert result.code == 1
    assert f"CORRUPT {STABLE}: the signature does not verify" in result.stdout
    result = await run_cli("verify", "--fix", "--config", str(tmp_path / "mirror.yaml"), cwd=tmp_path)
    assert "removed 2 files" in result.stdout, result.stdout
    assert not (files / RUSTC).exists() and not (files / STABLE).exists()
