"""`cratemirror client-config` prints what really points the real cargo at a mirror."""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from tests.fake_upstream import FakeRegistry, run_cargo, write_cargo_project


async def client_config(url: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cratemirror", "client-config", "--url", url,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0
    return out.decode()


async def test_printed_config_file_and_flags_work_with_real_cargo(
    registry: FakeRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    registry.add_crate("serde", "1.0.0")
    base = str(mirror.make_url("")).rstrip("/")
    printed = await client_config(base)
    toml = printed.split("[source.crates-io]", 1)[1].split("\n\n#", 1)[0]
    assert f'registry = "sparse+{base}/index/"' in toml
    project = tmp_path / "app"
    write_cargo_project(project, {"serde": "1"})

    # 1: the snippet as CARGO_HOME/config.toml
    home = tmp_path / "home-file"
    home.mkdir()
    (home / "config.toml").write_text("[source.crates-io]" + toml)
    code, output = await run_cargo(["generate-lockfile"], project, home)
    assert code == 0, output
    assert 'name = "serde"' in (project / "Cargo.lock").read_text()

    # 2: the per-command flags line, with an empty CARGO_HOME
    flags_line = next(line for line in printed.splitlines() if line.startswith("cargo --config"))
    args = [*shlex.split(flags_line)[1:-1], "generate-lockfile"]  # drop "cargo" and the example "fetch"
    (project / "Cargo.lock").unlink()
    code, output = await run_cargo(args, project, tmp_path / "home-flags")
    assert code == 0, output
    assert registry.count("/index/se/rd/serde") == 1  # the second run was served from the mirror's cache
