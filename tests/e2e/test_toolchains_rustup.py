"""The real rustup through the mirror's /toolchains routes, against a fake dist server (tests/dist_server.py)
whose manifests are signed at test time with a throwaway key the mirror is configured to trust."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp.test_utils import TestClient

from cratemirror.http.app import create_app
from tests.conftest import make_config
from tests.dist_server import DistServer, TestSigningKey, build_release, have_gpg
from tests.mirror_process import MirrorProcess

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("rustup") is None, reason="rustup is not installed"),
    pytest.mark.skipif(not have_gpg(), reason="gpg/gpgv (GnuPG) is not installed"),
]

RUSTUP_TIMEOUT = 120.0


@dataclass
class Setup:
    key: TestSigningKey
    dist: DistServer
    tmp: Path


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    key = await asyncio.to_thread(TestSigningKey, tmp_path / "gnupg")
    async with DistServer(key) as dist:
        dist.publish(build_release("stable", "1.90.0", "2026-01-01"))
        yield Setup(key, dist, tmp_path)


async def start_mirror(
    aiohttp_client: Any, setup: Setup, cache: str = "cache", **changes: Any
) -> TestClient[Any, Any]:
    config = make_config(
        "http://127.0.0.1:9/index/",  # crates.io's side is not used here
        setup.tmp / cache,
        toolchains__upstream=setup.dist.url,
        toolchains__signing_key=setup.key.public_key,
        **changes,
    )
    client: TestClient[Any, Any] = await aiohttp_client(create_app(config))
    return client


class Mirror(Protocol):
    """A mirror rustup can be pointed at: a TestClient, or `Remote` for a mirror process."""

    def make_url(self, path: str) -> Any: ...


async def rustup(
    client: Mirror,
    home: Path,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[int, str]:
    """The real rustup with a fresh RUSTUP_HOME/CARGO_HOME under `home`, pointed at the mirror (by
    `env` when given: the RUSTUP_* variables the test got from client-config)."""
    base = str(client.make_url("")).rstrip("/")
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("RUSTUP_", "CARGO", "RUSTC"))
    }
    environment.update(
        RUSTUP_HOME=str(home / "rustup"),
        CARGO_HOME=str(home / "cargo"),
        RUSTUP_DIST_SERVER=f"{base}/toolchains",
        RUSTUP_UPDATE_ROOT=f"{base}/toolchains/rustup",
        RUSTUP_MAX_RETRIES="0",
        PATH=f"{Path(shutil.which('rustup') or 'rustup').parent}:{environment.get('PATH', '')}",
    )
    environment.update(env or {})
    process = await asyncio.create_subprocess_exec(
        "rustup",
        *args,
        env=environment,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), RUSTUP_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def install(
    client: Mirror, home: Path, toolchain: str = "stable", env: dict[str, str] | None = None
) -> str:
    code, output = await rustup(
        client, home, "toolchain", "install", toolchain, "--profile", "minimal", "--no-self-update", env=env
    )
    assert code == 0, output
    return output


async def rustc_version(client: TestClient[Any, Any], home: Path, toolchain: str = "stable") -> str:
    code, output = await rustup(client, home, "run", toolchain, "rustc", "--version")
    assert code == 0, output
    return output.strip()


def stored_components(cache: Path) -> list[Path]:
    return sorted((cache / "toolchains" / "files" / "dist").glob("*/*.tar.*"))


async def test_install_and_run_through_the_mirror_then_a_second_runner_from_cache(
    aiohttp_client: Any, setup: Setup
) -> None:
    client = await start_mirror(aiohttp_client, setup)
    await install(client, setup.tmp / "runner1")
    assert await rustc_version(client, setup.tmp / "runner1") == "rustc 1.90.0 (0000000 2026-01-01)"
    assert setup.dist.component_requests() == 1
    assert len(stored_components(setup.tmp / "cache")) == 1
    # A second runner, fresh homes: the component comes from the cache, not upstream.
    await install(client, setup.tmp / "runner2")
    assert await rustc_version(client, setup.tmp / "runner2") == "rustc 1.90.0 (0000000 2026-01-01)"
    assert setup.dist.component_requests() == 1
    metrics = await (await client.get("/metrics")).text()
    assert 'cratemirror_cache_requests_total{kind="toolchain",registry="crates-io",result="hit"}' in metrics


async def test_a_new_stable_appears_within_the_ttl(aiohttp_client: Any, setup: Setup) -> None:
    client = await start_mirror(aiohttp_client, setup, toolchains__manifest_ttl=0.5)
    home = setup.tmp / "runner"
    await install(client, home)
    setup.dist.publish(build_release("stable", "1.91.0", "2026-02-01"))
    await asyncio.sleep(0.6)  # the TTL itself is what is under test: no event marks its end
    code, output = await rustup(client, home, "update", "stable", "--no-self-update")
    assert code == 0, output
    assert await rustc_version(client, home) == "rustc 1.91.0 (0000000 2026-02-01)"


async def test_a_manifest_that_does_not_verify_is_refused_and_rustup_stays_on_the_good_one(
    aiohttp_client: Any, setup: Setup
) -> None:
    client = await start_mirror(aiohttp_client, setup, toolchains__manifest_ttl=0.5, cache__stale_if_error=0)
    home = setup.tmp / "runner"
    await install(client, home)
    # A new stable whose .sha256 matches its bytes, signed by a key the mirror does not trust.
    impostor = await asyncio.to_thread(TestSigningKey, setup.tmp / "impostor")
    bad = build_release("stable", "6.6.6", "2026-03-01")
    setup.dist.publish(bad)
    setup.dist.override["dist/channel-rust-stable.toml.asc"] = impostor.sign(bad.manifest)
    await asyncio.sleep(0.6)
    answer = await client.get("/toolchains/dist/channel-rust-stable.toml")
    assert answer.status == 502
    reason = await answer.text()
    assert "channel-rust-stable.toml" in reason and str(setup.key.public_key) in reason
    code, output = await rustup(client, home, "update", "stable", "--no-self-update")
    assert code != 0, output  # rustup says it could not update
    assert await rustc_version(client, home) == "rustc 1.90.0 (0000000 2026-01-01)"
    stored = (setup.tmp / "cache" / "toolchains" / "files" / "dist" / "channel-rust-stable.toml").read_bytes()
    assert b"6.6.6" not in stored
    # With stale-if-error, the last good manifest keeps being served.
    client2 = await start_mirror(aiohttp_client, setup, toolchains__manifest_ttl=0.5)
    answer = await client2.get("/toolchains/dist/channel-rust-stable.toml")
    assert answer.status == 200 and answer.headers["X-Cache"] == "STALE"
    assert b"1.90.0" in await answer.read()


async def test_a_component_with_wrong_bytes_is_refused_and_not_stored(
    aiohttp_client: Any, setup: Setup
) -> None:
    client = await start_mirror(aiohttp_client, setup)
    release = build_release("stable", "1.90.0", "2026-01-01")
    component = next(path for path in release.files if "rustc-" in path)
    setup.dist.override[component] = release.files[component][:-10] + b"0123456789"
    args = ("toolchain", "install", "stable", "--profile", "minimal", "--no-self-update")
    code, output = await rustup(client, setup.tmp / "runner", *args)
    assert code != 0, output
    assert stored_components(setup.tmp / "cache") == []
    answer = await client.get(f"/toolchains/{component}")
    assert answer.status == 502
    assert "sha256 mismatch" in await answer.text()


async def test_with_the_dist_server_down_a_fresh_runner_installs_the_cached_stable(
    aiohttp_client: Any, setup: Setup
) -> None:
    client = await start_mirror(aiohttp_client, setup, toolchains__manifest_ttl=0)
    await install(client, setup.tmp / "runner1")
    await setup.dist.stop()
    await install(client, setup.tmp / "runner2")
    assert await rustc_version(client, setup.tmp / "runner2") == "rustc 1.90.0 (0000000 2026-01-01)"


async def test_the_lines_client_config_rustup_prints_point_rustup_at_the_mirror(
    aiohttp_client: Any, setup: Setup
) -> None:
    client = await start_mirror(aiohttp_client, setup)
    base = str(client.make_url("")).rstrip("/")
    printed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cratemirror", "client-config", "--rustup", "--url", base,
        cwd=setup.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await printed.communicate()
    assert printed.returncode == 0, err
    variables = dict(
        line.removeprefix("export ").replace('"', "").split("=", 1)
        for line in out.decode().splitlines()
        if line.startswith("export ")
    )
    assert variables == {
        "RUSTUP_DIST_SERVER": f"{base}/toolchains",
        "RUSTUP_UPDATE_ROOT": f"{base}/toolchains/rustup",
    }
    home = setup.tmp / "runner"
    await install(client, home, env=variables)
    assert await rustc_version(client, home) == "rustc 1.90.0 (0000000 2026-01-01)"
    page = await (await client.get("/")).text()
    assert f"export RUSTUP_DIST_SERVER=&quot;{base}/toolchains&quot;" in page


async def cratemirror_cli(*args: str, cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cratemirror", *args,
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), RUSTUP_TIMEOUT)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def test_warm_a_rust_toolchain_toml_then_install_with_the_dist_server_down(
    aiohttp_client: Any, setup: Setup
) -> None:
    project = setup.tmp / "project"
    project.mkdir()
    (project / "rust-toolchain.toml").write_text('[toolchain]\nchannel = "1.90.0"\nprofile = "minimal"\n')
    setup.dist.publish(build_release("1.90.0", "1.90.0", "2026-01-01"))
    (setup.tmp / "mirror.yaml").write_text(
        f"cache:\n  dir: {setup.tmp / 'cache'}\n"
        f"toolchains:\n  upstream: {setup.dist.url}\n  signing_key: {setup.key.public_key}\n"
    )
    code, output = await cratemirror_cli(
        "warm",
        str(project / "rust-toolchain.toml"),
        "--config",
        str(setup.tmp / "mirror.yaml"),
        cwd=setup.tmp,
    )
    assert code == 0, output
    assert "1 files: 1 fetched, 0 already cached, 0 failed" in output
    await setup.dist.stop()
    client = await start_mirror(aiohttp_client, setup, offline=True)
    code, output = await rustup(
        client, setup.tmp / "runner", "toolchain", "install", "--no-self-update", cwd=project
    )
    assert code == 0, output
    code, output = await rustup(
        client, setup.tmp / "runner", "run", "1.90.0", "rustc", "--version", cwd=project
    )
    assert code == 0 and output.strip() == "rustc 1.90.0 (0000000 2026-01-01)", output
    # Through a running mirror: the same toolchain, now a hit.
    code, output = await cratemirror_cli(
        "warm",
        "--toolchain",
        "1.90.0",
        "--profile",
        "minimal",
        "--mirror",
        str(client.make_url("")),
        cwd=setup.tmp,
    )
    assert code == 0, output
    assert "1 files: 0 fetched, 1 already cached, 0 failed" in output


def write_config(setup: Setup, name: str, cache: str) -> Path:
    path = setup.tmp / name
    path.write_text(
        f"cache:\n  dir: {setup.tmp / cache}\n"
        f"toolchains:\n  upstream: {setup.dist.url}\n  signing_key: {setup.key.public_key}\n"
    )
    return path


async def test_export_import_round_trip_into_a_second_cache_with_the_dist_server_down(
    aiohttp_client: Any, setup: Setup
) -> None:
    client = await start_mirror(aiohttp_client, setup)
    await install(client, setup.tmp / "runner1")
    bundle = setup.tmp / "bundle.tar"
    config = write_config(setup, "a.yaml", "cache")
    code, output = await cratemirror_cli(
        "export", str(bundle), "--toolchain", "stable", "--config", str(config), cwd=setup.tmp
    )
    assert code == 0, output
    assert "3 toolchain files" in output  # the manifest, its signature, rustc
    await setup.dist.stop()
    code, output = await cratemirror_cli(
        "import", str(bundle), "--config", str(write_config(setup, "b.yaml", "cache-b")), cwd=setup.tmp
    )
    assert code == 0, output
    assert "toolchain files: 2 loaded, 0 already cached, 0 refused" in output
    second = await start_mirror(aiohttp_client, setup, cache="cache-b")
    await install(second, setup.tmp / "runner2")
    assert await rustc_version(second, setup.tmp / "runner2") == "rustc 1.90.0 (0000000 2026-01-01)"


async def test_two_runners_at_once_through_a_two_worker_serve_process(setup: Setup) -> None:
    """The real `cratemirror serve --workers 2` (config from the environment): two fresh runners install at
    the same time; the workers share one upstream fetch per file (the cache dir's locks)."""
    mirror = MirrorProcess(
        "http://127.0.0.1:9/index/", setup.tmp / "cache", setup.tmp, workers=2,
        env={
            "CRATEMIRROR_TOOLCHAINS_UPSTREAM": setup.dist.url,
            "CRATEMIRROR_TOOLCHAINS_SIGNING_KEY": str(setup.key.public_key),
        },
    )  # fmt: skip
    setup.dist.delay = 0.2  # both runners ask while the first fetches are in flight
    async with mirror:
        base = mirror.url
        env = {"RUSTUP_DIST_SERVER": f"{base}/toolchains", "RUSTUP_UPDATE_ROOT": f"{base}/toolchains/rustup"}
        client = Remote(base)
        outputs = await asyncio.gather(
            install(client, setup.tmp / "runner1", env=env),
            install(client, setup.tmp / "runner2", env=env),
        )
        assert all("installed" in output for output in outputs), outputs
    assert setup.dist.component_requests() == 1
    assert setup.dist.requests["dist/channel-rust-stable.toml"] == 1


class Remote:
    """What `rustup()` needs of a TestClient (its base URL), for a mirror running as a process."""

    def __init__(self, base: str) -> None:
        self.base = base

    def make_url(self, path: str) -> str:
        return f"{self.base}/{path}"
