"""Tools that cannot pass silently: each says when it checked nothing, refuses what it cannot do, and
answers a bad argument with its own usage line."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cratemirror.__main__ import build_parser
from tests.fake_upstream import FakeRegistry
from tests.tools_support import CRATES_IO, run_cli, seed_cache, write_config


def lockfile(path: Path, crates: dict[str, str]) -> Path:
    path.write_text(
        "version = 4\n\n"
        + "\n".join(
            f'[[package]]\nname = "{name}"\nversion = "{version}"\nsource = "{CRATES_IO}"\n'
            for name, version in crates.items()
        )
    )
    return path


def with_policy(config: Path, policy: str) -> Path:
    config.write_text(config.read_text() + "policy:\n" + policy)
    return config


async def test_policy_check_without_a_policy_says_so(registry: FakeRegistry, tmp_path: Path) -> None:
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, tmp_path / "cache")
    lock = lockfile(tmp_path / "Cargo.lock", {"serde": "1.0.0"})
    result = await run_cli("policy", "check", str(lock), "--config", str(config), cwd=tmp_path)
    assert result.code == 0, result.output
    assert result.stdout.splitlines() == [
        f"policy check: no policy is configured in {config} (policy.advisory_db, policy.licenses and "
        "policy.deny are all empty): nothing to check"
    ]


async def test_a_missing_advisory_db_is_refused_by_both_checks(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    config = with_policy(
        write_config(tmp_path / "mirror.yaml", registry.index_url, tmp_path / "cache"),
        f"  mode: enforce\n  advisory_db: {tmp_path / 'nonexistent'}\n",
    )
    lock = lockfile(tmp_path / "Cargo.lock", {"serde": "1.0.0"})
    expected = "policy.advisory_db: expected a RustSec advisory-db checkout (a directory with crates/)"
    for args in (["policy", "check", str(lock)], ["config", "check"]):
        result = await run_cli(*args, "--config", str(config), cwd=tmp_path)
        assert result.code == 2, result.output
        assert expected in result.stderr and "no such directory" in result.stderr, result.stderr


async def test_licences_of_crates_cached_before_the_rule_are_read(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    registry.add_crate("permissive", "1.0.0", license="MIT")
    registry.add_crate("copyleft", "1.0.0", license="GPL-3.0-only")
    cache = tmp_path / "cache"
    seed_cache(cache, registry, {"permissive": "1.0.0", "copyleft": "1.0.0"}, fetched_at=time.time())
    config = with_policy(
        write_config(tmp_path / "mirror.yaml", registry.index_url, cache),
        "  mode: enforce\n  licenses: [MIT]\n",
    )
    lock = lockfile(tmp_path / "Cargo.lock", {"permissive": "1.0.0", "copyleft": "1.0.0"})
    result = await run_cli("policy", "check", str(lock), "--config", str(config), cwd=tmp_path)
    assert result.code == 1, result.output
    assert "UNKNOWN LICENCE" not in result.stdout
    assert "BLOCK copyleft 1.0.0 [license]" in result.stdout
    assert "permissive" not in result.stdout.replace("2 crates", "")
    assert "1 blocked" in result.stdout


async def test_token_add_warns_when_auth_is_off_and_names_client_configs_variable(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(f"auth:\n  tokens_file: {tmp_path / 'tokens.yaml'}\n")
    result = await run_cli("token", "add", "ci", "--config", str(config), cwd=tmp_path)
    assert result.code == 0, result.output
    assert "CARGO_REGISTRIES_MIRROR_TOKEN=<token>" in result.stderr
    assert "<NAME>" not in result.stderr
    assert "warning: auth.required is false" in result.stderr

    config.write_text(f"auth:\n  required: true\n  tokens_file: {tmp_path / 'tokens.yaml'}\n")
    result = await run_cli("token", "add", "ci2", "--config", str(config), cwd=tmp_path)
    assert result.code == 0 and "warning" not in result.stderr, result.output
    clients = await run_cli("client-config", "--config", str(config), cwd=tmp_path)
    assert "CARGO_REGISTRIES_MIRROR_TOKEN=<token>" in clients.stdout  # the same name in both


async def test_a_bad_flag_value_gets_the_subcommands_usage(tmp_path: Path) -> None:
    result = await run_cli("token", "add", "x", "--expires", "3 months", cwd=tmp_path)
    assert result.code == 2
    assert result.stderr.splitlines() == [
        "usage: cratemirror token add [-h] [--expires DURATION] [--config PATH] NAME",
        "cratemirror token add: error: --expires: expected a duration like 90d, got '3 months'",
    ]
    result = await run_cli("config", "check", "--help", cwd=tmp_path)
    assert result.stdout.startswith("usage: cratemirror config check")
    assert "Paths the config names" in result.stdout


def leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += [sub, *leaves(sub)]
    return found


def test_every_subcommand_has_a_description() -> None:
    missing = [sub.prog for sub in leaves(build_parser()) if not sub.description]
    assert missing == []
    help_text = next(
        sub for sub in leaves(build_parser()) if sub.prog.endswith("client-config")
    ).format_help()
    assert "default http://127.0.0.1:8080" in help_text  # --url's default


async def test_refresh_of_a_name_upstream_does_not_have_fails(registry: FakeRegistry, tmp_path: Path) -> None:
    registry.add_crate("serde", "1.0.0")
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, tmp_path / "cache")
    result = await run_cli("refresh", "serde", "nosuchcrate", "--config", str(config), cwd=tmp_path)
    assert result.code == 1, result.output
    assert result.stdout == "refresh: serde: revalidated\n"
    assert "refresh: FAILED nosuchcrate: not found upstream" in result.stderr
