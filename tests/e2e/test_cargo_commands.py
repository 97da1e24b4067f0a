"""The README's "cargo commands through the mirror" table, checked with the real cargo: what works
unchanged, and the flags the others need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from cratemirror.config.client import cargo_config_snippet
from tests.fake_upstream import (
    SMALL_TREE_DEPS,
    FakeRegistry,
    publish_small_tree,
    run_cargo,
    write_cargo_project,
)
from tests.system_tools import require_tool


def cargo_home(path: Path, base: str, extra: str = "") -> Path:
    path.mkdir(parents=True)
    (path / "config.toml").write_text(cargo_config_snippet(base) + extra + "\n[net]\nretry = 0\n")
    return path


async def test_cargo_commands_table(
    registry: FakeRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    require_tool("cargo", "rustup or Debian package cargo")
    publish_small_tree(registry)
    base = str(mirror.make_url("")).rstrip("/")
    home = cargo_home(tmp_path / "home", base)
    project = tmp_path / "app"
    write_cargo_project(project, SMALL_TREE_DEPS)
    code, output = await run_cargo(["generate-lockfile"], project, home)
    assert code == 0, output
    before = registry.requests.total()

    # vendor: plain, it ignores source replacement and asks index.crates.io (never this mirror) ...
    code, output = await run_cargo(["vendor"], project, home)
    assert "Updating crates.io index" in output, output
    assert registry.requests.total() == before
    # ... with --respect-source-config it vendors through the mirror.
    code, output = await run_cargo(["vendor", "--respect-source-config"], project, home)
    assert code == 0, output
    assert (project / "vendor" / "a" / "Cargo.toml").exists()

    # info: plain, cargo refuses; with a [registries] entry and --registry it works.
    code, output = await run_cargo(["info", "a"], project, home)
    assert code != 0 and "include `--registry crates-io`" in output, output
    registries = f'\n[registries.mirror]\nindex = "sparse+{base}/index/"\n'
    info_home = cargo_home(tmp_path / "home-info", base, registries)
    code, output = await run_cargo(["info", "a", "--registry", "mirror"], project, info_home)
    assert code == 0 and "version: 1.1.0" in output, output

    # search/publish/yank/owner: cargo points at --registry crates-io itself.
    code, output = await run_cargo(["search", "a"], project, home)
    assert code != 0 and "include `--registry crates-io`" in output, output

    # install resolves and downloads through the mirror (these test crates have no binary to install).
    registry.add_crate("tool", "1.0.0")
    code, output = await run_cargo(["install", "tool"], project, home)
    assert "Downloaded tool v1.0.0 (registry `mirror`)" in output, output
    assert registry.count("/crates/tool/1.0.0/download") == 1

    # offline, locked, frozen.
    for flag in ("--offline", "--locked", "--frozen"):
        code, output = await run_cargo(["build", flag], project, home)
        assert code == 0, (flag, output)

    # Without sparse+ cargo takes the URL for a git index and fails.
    git_home = tmp_path / "home-git"
    git_home.mkdir()
    (git_home / "config.toml").write_text(cargo_config_snippet(base).replace("sparse+", ""))
    (project / "Cargo.lock").unlink()
    code, output = await run_cargo(["generate-lockfile"], project, git_home)
    assert code != 0 and "network failure" in output, output

    # add resolves the newest version through the mirror.
    code, output = await run_cargo(["add", "z"], project, home)
    assert code == 0 and "Adding z v0.1.0" in output, output
