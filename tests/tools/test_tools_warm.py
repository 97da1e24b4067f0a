"""`cratemirror warm`: Cargo.lock parsing, filling a cache dir directly, and warming through a mirror."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path
from urllib.parse import quote

import pytest

from cratemirror.fleet.storage.disk import Store
from cratemirror.tools.common import Progress
from cratemirror.tools.lockfile import parse_lockfile
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path
from tests.tools_support import (
    CRATES_IO,
    cargo_fetch_through,
    crate_file,
    mirror_url,
    publish_sample,
    real_lockfile,
    run_cli,
    write_config,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


def tarball_requests(registry: FakeRegistry) -> int:
    return sum(count for path, count in registry.requests.items() if path.startswith("/crates/"))


# --- Cargo.lock formats ------------------------------------------------------------------------------


def test_lockfile_v1_keeps_checksums_in_metadata() -> None:
    text = f"""
[[package]]
name = "app"
version = "0.1.0"
dependencies = ["serde 1.0.0 ({CRATES_IO})"]

[[package]]
name = "serde"
version = "1.0.0"
source = "{CRATES_IO}"

[[package]]
name = "mygit"
version = "0.3.0"
source = "git+https://example.com/mygit#0123456789abcdef"

[metadata]
"checksum serde 1.0.0 ({CRATES_IO})" = "{SHA_A.upper()}"
"checksum mygit 0.3.0 (git+https://example.com/mygit#0123456789abcdef)" = "<none>"
"""
    locked = parse_lockfile(text, "Cargo.lock")
    assert [(c.name, c.version, c.checksum) for c in locked.crates] == [("serde", "1.0.0", SHA_A)]
    assert dict(locked.skipped) == {"path": 1, "git": 1}


@pytest.mark.parametrize("version", [None, 3, 4])
def test_lockfile_v2_to_v4_checksum_per_package(version: int | None) -> None:
    header = f"version = {version}\n" if version else ""
    text = f"""{header}
[[package]]
name = "Inflect"
version = "0.1.0"
source = "{CRATES_IO}"
checksum = "{SHA_A}"

[[package]]
name = "b"
version = "0.2.1+build.5"
source = "sparse+https://index.crates.io/"
checksum = "{SHA_B}"

[[package]]
name = "private"
version = "1.0.0"
source = "sparse+https://crates.internal.example/index/"
checksum = "{SHA_B}"

[[package]]
name = "local"
version = "0.1.0"
"""
    locked = parse_lockfile(text, "Cargo.lock")
    assert [(c.name, c.version, c.checksum) for c in locked.crates] == [
        ("Inflect", "0.1.0", SHA_A),
        ("b", "0.2.1+build.5", SHA_B),
    ]
    assert dict(locked.skipped) == {"path": 1, "other registry": 1}
    assert locked.skipped_text() == "2 skipped (1 other registry, 1 path)"


def test_progress_bar_on_a_terminal_and_lines_elsewhere() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        progress = Progress("warm", 2, stream=stream)
        progress.step("a 1.0.0", "fetched a 1.0.0")
        progress.note("FAILED b 1.0.0: boom")
        progress.step("b 1.0.0")
        progress.finish()
    assert "\r" in terminal.getvalue() and "1/2" in terminal.getvalue() and "#" in terminal.getvalue()
    assert "warm: FAILED b 1.0.0: boom\n" in terminal.getvalue()
    assert log.getvalue() == "warm: [1/2] fetched a 1.0.0\nwarm: FAILED b 1.0.0: boom\n"


# --- warm --config: the cache dir directly, then a mirror serves it with the upstream down -------------


async def test_warm_real_lockfile_then_serve_with_upstream_down(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    expected = publish_sample(registry)
    project = await real_lockfile(tmp_path, registry)
    lock = tomllib.loads((project / "Cargo.lock").read_text())
    assert {p["name"]: p["version"] for p in lock["package"] if p.get("source") == CRATES_IO} == expected

    cache = tmp_path / "warm-cache"
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, cache)
    registry.reset_counts()
    result = await run_cli("warm", str(project / "Cargo.lock"), "--config", str(config), cwd=tmp_path)
    print(result.output)  # the lead quotes this summary
    assert result.code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        "warm: 4 crates: 4 fetched, 0 already cached, 0 failed; 1 skipped (1 path)"
    )
    assert tarball_requests(registry) == 4
    for name, version in expected.items():
        assert crate_file(cache, name, version).read_bytes() == registry.get_version(name, version).data
        assert registry.count(f"/index/{index_path(name)}") == 1

    # Again, with the upstream gone: everything is already there (index files still fresh).
    registry.down = True
    again = await run_cli("warm", str(project / "Cargo.lock"), "--config", str(config), cwd=tmp_path)
    assert again.code == 0, again.output
    assert again.stdout.splitlines()[-1].startswith("warm: 4 crates: 0 fetched, 4 already cached, 0 failed")

    # A mirror on that cache serves the real cargo without ever reaching the (down) upstream.
    registry.reset_counts()
    client = await mirror_factory(cache_dir=cache)
    await cargo_fetch_through(client, project, tmp_path / "cargo-home-mirror")
    assert tarball_requests(registry) == 0
    assert registry.count("/index/") == 0


async def test_warm_fails_on_a_lockfile_checksum_mismatch(registry: FakeRegistry, tmp_path: Path) -> None:
    good = registry.add_crate("good", "1.0.0")
    registry.add_crate("evil", "2.0.0")
    lockfile = tmp_path / "Cargo.lock"
    lockfile.write_text(
        f'[[package]]\nname = "good"\nversion = "1.0.0"\nsource = "{CRATES_IO}"\n\n'
        f'[[package]]\nname = "evil"\nversion = "2.0.0"\nsource = "{CRATES_IO}"\n\n'
        f'[metadata]\n"checksum good 1.0.0 ({CRATES_IO})" = "{good.cksum}"\n'
        f'"checksum evil 2.0.0 ({CRATES_IO})" = "{SHA_A}"\n'
    )
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, cache)
    result = await run_cli("warm", str(lockfile), "--config", str(config), "--jobs", "1", cwd=tmp_path)
    assert result.code == 1, result.output
    assert "FAILED evil 2.0.0: the lockfile's checksum" in result.stderr
    assert (
        result.stdout.splitlines()[-1]
        == "warm: 2 crates: 1 fetched, 0 already cached, 1 failed; 0 skipped (git/path)"
    )
    assert crate_file(cache, "good", "1.0.0").is_file()
    assert not crate_file(cache, "evil", "2.0.0").exists()
    assert registry.count("/crates/evil/") == 0  # refused before downloading


async def test_warm_obeys_the_policy(registry: FakeRegistry, tmp_path: Path) -> None:
    """warm takes the server's own download decision: what the policy blocks is never fetched."""
    good = registry.add_crate("good", "1.0.0")
    evil = registry.add_crate("evil", "2.0.0")
    lockfile = tmp_path / "Cargo.lock"
    lockfile.write_text(
        "version = 3\n\n"
        + "".join(
            f'[[package]]\nname = "{c.name}"\nversion = "{c.vers}"\nsource = "{CRATES_IO}"\n'
            f'checksum = "{c.cksum}"\n\n'
            for c in (good, evil)
        )
    )
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "mirror.yaml", registry.index_url, cache)
    config.write_text(config.read_text() + "policy:\n  mode: enforce\n  deny: [evil]\n")
    result = await run_cli("warm", str(lockfile), "--config", str(config), "--jobs", "1", cwd=tmp_path)
    assert result.code == 1, result.output
    assert "FAILED evil 2.0.0: blocked by the policy (deny)" in result.stderr
    assert crate_file(cache, "good", "1.0.0").is_file()
    assert not crate_file(cache, "evil", "2.0.0").exists()
    assert registry.count("/crates/evil/") == 0  # refused before downloading


# --- warm --mirror: through a running mirror ---------------------------------------------------------


async def test_warm_through_a_running_mirror(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    crates = [registry.add_crate("alpha", "1.0.0"), registry.add_crate("beta", "0.1.0+meta")]
    crates.append(registry.add_crate("Gamma", "3.0.0"))
    registry.add_crate("alpha", "1.1.0")  # in the index, not in the lockfile: never fetched
    packages = "".join(
        f'[[package]]\nname = "{cv.name}"\nversion = "{cv.vers}"\nsource = "{CRATES_IO}"\n'
        f'checksum = "{cv.cksum}"\n\n'
        for cv in crates
    )
    lockfile = tmp_path / "Cargo.lock"
    lockfile.write_text(
        f"version = 4\n\n{packages}"
        '[[package]]\nname = "app"\nversion = "0.1.0"\n\n'
        '[[package]]\nname = "vendored"\nversion = "0.1.0"\nsource = "git+https://example.com/v#abc"\n'
    )
    cache = tmp_path / "mirror-cache"
    client = await mirror_factory(cache_dir=cache)

    result = await run_cli("warm", str(lockfile), "--mirror", mirror_url(client), "--jobs", "2", cwd=tmp_path)
    print(result.output)
    assert result.code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        "warm: 3 crates: 3 fetched, 0 already cached, 0 failed; 2 skipped (1 git, 1 path)"
    )
    assert "fetched beta 0.1.0+meta" in result.stderr
    for cv in crates:
        assert crate_file(cache, cv.name, cv.vers).read_bytes() == cv.data
        assert registry.count(f"/crates/{cv.name}/{quote(cv.vers, safe='')}/download") == 1
    assert registry.count("/crates/alpha/1.1.0/") == 0

    again = await run_cli("warm", str(lockfile), "--mirror", mirror_url(client) + "/index/", cwd=tmp_path)
    assert again.code == 0, again.output
    assert again.stdout.splitlines()[-1].startswith("warm: 3 crates: 0 fetched, 3 already cached, 0 failed")
    assert tarball_requests(registry) == 3  # nothing fetched twice

    store = Store(cache)
    try:
        for cv in crates:
            meta = store.get_crate_meta(cv.name, cv.vers)
            assert meta is not None and meta.sha256 == cv.cksum
    finally:
        store.close()


async def test_warm_through_a_mirror_reports_unknown_crates(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    lockfile = tmp_path / "Cargo.lock"
    lockfile.write_text(
        f'version = 3\n\n[[package]]\nname = "ghost"\nversion = "1.0.0"\nsource = "{CRATES_IO}"\n'
    )
    client = await mirror_factory()
    result = await run_cli("warm", str(lockfile), "--mirror", mirror_url(client), cwd=tmp_path)
    assert result.code == 1, result.output
    assert "FAILED ghost 1.0.0: the mirror does not know crate 'ghost' (404)" in result.stderr
    assert result.stdout.splitlines()[-1].startswith("warm: 1 crate: 0 fetched, 0 already cached, 1 failed")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["warm", "missing.lock", "--mirror", "http://127.0.0.1:9"], "missing.lock: cannot read lockfile"),
        (["warm", "Cargo.lock", "--mirror", "ftp://x"], "--mirror: expected an http(s) URL"),
        (
            ["warm", "Cargo.lock", "--config", "mirror.yaml", "--mirror", "http://127.0.0.1:9"],
            "not allowed with",
        ),
        (["warm", "Cargo.lock", "--jobs", "0"], "expected a whole number >= 1"),
        (["warm", "not-toml.lock", "--mirror", "http://127.0.0.1:9"], "not-toml.lock: not a Cargo.lock"),
    ],
)
async def test_warm_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "Cargo.lock").write_text("version = 4\n")
    (tmp_path / "not-toml.lock").write_text("[[package]\n")
    (tmp_path / "mirror.yaml").write_text("{}\n")
    result = await run_cli(*args, cwd=tmp_path)
    assert result.code == 2, result.output
    assert message in result.stderr
