"""The policy with the real cargo and the real server process: resolution steps around a vulnerable
newest version, a lockfile pinned to it fails with the advisory id in cargo's output, a GPL-only crate is
refused under an MIT/Apache allowlist while `MIT OR GPL-3.0` passes, `policy check` says the same as
enforcement, and an edited advisory-db takes effect in a running server without a restart."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, run_cargo, write_cargo_home, write_cargo_project
from tests.mirror_process import MirrorProcess, wait_until
from tests.policy_support import LEAF_ADVISORY, LICENCES, publish_policy_tree, synthetic_db, write_advisory
from tests.system_tools import require_tool
from tests.tools_support import run_cli

Client = TestClient[Any, Any]


def require_cargo() -> None:
    require_tool("cargo", "rustup or Debian package cargo")


def locked(project: Path) -> dict[str, str]:
    lock = tomllib.loads((project / "Cargo.lock").read_text())
    return {p["name"]: p["version"] for p in lock["package"] if p["name"] != "app"}


def home_for(tmp_path: Path, name: str, base: str) -> Path:
    home = tmp_path / name
    write_cargo_home(home, f"{base.rstrip('/')}/index/")
    return home


def base_of(mirror: Client) -> str:
    return str(mirror.make_url("")).rstrip("/")


def write_config(path: Path, cache: Path, **policy: object) -> Path:
    lines = ["cache:", f"  dir: {cache}", "policy:"]
    for key, value in policy.items():
        shown = "[" + ", ".join(f'"{item}"' for item in value) + "]" if isinstance(value, tuple) else value
        lines.append(f"  {key}: {shown}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return synthetic_db(tmp_path / "advisory-db")


async def test_resolution_avoids_the_vulnerable_newest_version(
    registry: FakeRegistry, mirror_factory: MirrorFactory, db: Path, tmp_path: Path
) -> None:
    require_cargo()
    publish_policy_tree(registry)
    mirror = await mirror_factory(policy__mode="enforce", policy__advisory_db=db)
    project = tmp_path / "app"
    write_cargo_project(project, {"top": "1"})
    home = home_for(tmp_path, "home", base_of(mirror))
    for args in (["generate-lockfile"], ["fetch"]):
        code, output = await run_cargo(args, project, home)
        assert code == 0, output
    assert locked(project) == {"top": "1.1.0", "mid": "0.2.0", "leaf": "0.3.1"}  # not 0.3.2
    assert registry.count("/leaf/0.3.2/") == registry.count("/leaf/0.3.0/") == 0


async def test_a_lockfile_pinned_to_the_vulnerable_version_fails_with_the_advisory_id(
    registry: FakeRegistry, mirror_factory: MirrorFactory, db: Path, tmp_path: Path
) -> None:
    require_cargo()
    publish_policy_tree(registry)
    project = tmp_path / "app"
    write_cargo_project(project, {"top": "1"})
    # In report mode nothing is blocked: cargo locks the newest leaf, 0.3.2, and fetches it.
    reporting = await mirror_factory(
        cache_dir=tmp_path / "cache-report", policy__mode="report", policy__advisory_db=db
    )
    home = home_for(tmp_path, "home-report", base_of(reporting))
    for args in (["generate-lockfile"], ["fetch"]):
        code, output = await run_cargo(args, project, home)
        assert code == 0, output
    assert locked(project)["leaf"] == "0.3.2"

    enforcing = await mirror_factory(
        cache_dir=tmp_path / "cache", policy__mode="enforce", policy__advisory_db=db
    )
    home = home_for(tmp_path, "home-enforce", base_of(enforcing))
    code, output = await run_cargo(["fetch", "--locked"], project, home)
    print(output)
    assert code != 0, output
    assert "403" in output and LEAF_ADVISORY in output, output
    assert "upgrade to a patched version (=0.3.1)" in output

    # `policy check` on the same lockfile with the same policy names the same block, and only it.
    config = write_config(tmp_path / "mirror.yaml", tmp_path / "cache", mode="enforce", advisory_db=db)
    result = await run_cli(
        "policy", "check", str(project / "Cargo.lock"), "--config", str(config), cwd=tmp_path
    )
    assert result.code == 1, result.output
    blocks = [line for line in result.stdout.splitlines() if line.startswith("BLOCK")]
    assert blocks == [line for line in blocks if line.startswith(f"BLOCK leaf 0.3.2 [{LEAF_ADVISORY}]")]
    assert len(blocks) == 1, result.output
    assert "3 crates" in result.stdout and "1 blocked" in result.stdout


async def test_a_gpl_only_crate_is_refused_and_a_dual_licensed_one_passes(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    require_cargo()
    publish_policy_tree(registry)
    mirror = await mirror_factory(
        cache_dir=tmp_path / "cache", policy__mode="enforce", policy__licenses=LICENCES
    )
    gpl = tmp_path / "gpl-app"
    write_cargo_project(gpl, {"gplonly": "1"})
    home = home_for(tmp_path, "home", base_of(mirror))
    code, output = await run_cargo(["generate-lockfile"], gpl, home)
    assert code == 0, output  # the licence is not in the index: only the download can tell
    code, output = await run_cargo(["fetch"], gpl, home)
    print(output)
    assert code != 0, output
    assert (
        "403" in output
        and "'GPL-3.0-only' is not satisfied by the allowed licences (MIT, Apache-2.0)" in output
    )

    dual = tmp_path / "dual-app"
    write_cargo_project(dual, {"dual": "1"})
    for args in (["generate-lockfile"], ["fetch"], ["build", "--offline"]):
        code, output = await run_cargo(args, dual, home)
        assert code == 0, output

    # The licence the mirror learned is what `policy check` uses: the same verdicts.
    config = write_config(tmp_path / "mirror.yaml", tmp_path / "cache", mode="enforce", licenses=LICENCES)
    for project, expected in ((gpl, 1), (dual, 0)):
        result = await run_cli(
            "policy", "check", str(project / "Cargo.lock"), "--config", str(config), cwd=tmp_path
        )
        assert result.code == expected, result.output
    result = await run_cli("policy", "check", str(gpl / "Cargo.lock"), "--config", str(config), cwd=tmp_path)
    assert "BLOCK gplonly 1.0.0 [license]" in result.stdout


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # A new connection per request, so the kernel spreads them over the worker processes.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def test_editing_the_db_takes_effect_without_a_restart(
    registry: FakeRegistry, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    publish_policy_tree(registry)
    db = synthetic_db(tmp_path / "advisory-db")
    config = write_config(tmp_path / "mirror.yaml", tmp_path / "cache", mode="enforce", advisory_db=db)
    async with MirrorProcess(
        registry.index_url, tmp_path / "cache", tmp_path, workers=2, extra_args=["--config", str(config)]
    ) as mirror:
        url = f"{mirror.url}/api/v1/crates/leaf/0.3.1/download"

        async def statuses() -> list[tuple[int, str]]:
            answers = []
            for _ in range(8):  # several connections: both workers answer some
                async with session.get(url) as response:
                    answers.append((response.status, response.headers.get("X-Cratemirror-Policy", "")))
            return answers

        assert {status for status, _ in await statuses()} == {200}
        async with session.get(f"{mirror.url}/index/le/af/leaf") as response:
            etag_before = response.headers["ETag"]

        advisory = write_advisory(db, "leaf", "RUSTSEC-2099-0004", patched=[">= 0.4.0"], title="leaf, again")

        async def all_blocked() -> bool:
            return set(await statuses()) == {(403, "RUSTSEC-2099-0004")}

        await wait_until(all_blocked, "every worker to apply the new advisory", timeout=20, interval=0.2)
        async with session.get(f"{mirror.url}/index/le/af/leaf") as response:
            assert response.headers["ETag"] != etag_before
            body = await response.read()
        assert all(b'"yanked":true' in line for line in body.splitlines())

        advisory.write_text(
            advisory.read_text().replace("[advisory]\n", '[advisory]\nwithdrawn = "2099-03-01"\n')
        )

        async def all_served() -> bool:
            return {status for status, _ in await statuses()} == {200}

        await wait_until(all_served, "every worker to drop the withdrawn advisory", timeout=20, interval=0.2)

        async def view_as_before() -> bool:  # both workers' views, over fresh connections
            etags = set()
            for _ in range(8):
                async with session.get(f"{mirror.url}/index/le/af/leaf") as response:
                    etags.add(response.headers["ETag"])
            return etags == {etag_before}

        await wait_until(view_as_before, "every worker's view to be as before", timeout=20, interval=0.2)
        assert await mirror.stop() == 0, mirror.output()
