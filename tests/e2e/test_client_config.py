"""`cratemirror client-config` prints what really points the real cargo at a mirror: the TOML used
verbatim as CARGO_HOME/config.toml, the `--ci` shell run twice (a cached CARGO_HOME), and the flag form;
the status page's copy texts are the same, and no Host header gets shell into them."""

from __future__ import annotations

import asyncio
import html
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cratemirror.config.client import BadBaseURL, cargo_ci_snippet, cargo_config_snippet
from tests.fake_upstream import FakeRegistry, run_cargo, write_cargo_project
from tests.system_tools import require_tool


async def client_config(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cratemirror", "client-config", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_shell(script: str, cargo_home: Path, cwd: Path) -> tuple[int, str]:
    """`sh -c script` with HOME and CARGO_HOME pointing into the test's directory."""
    shell = shutil.which("sh")
    assert shell is not None
    proc = await asyncio.create_subprocess_exec(
        shell, "-c", script, cwd=str(cwd),
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "CARGO_HOME": str(cargo_home)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def lock(project: Path, cargo_args: list[str], home: Path) -> None:
    (project / "Cargo.lock").unlink(missing_ok=True)
    code, output = await run_cargo([*cargo_args, "generate-lockfile"], project, home)
    assert code == 0, output
    assert 'name = "serde"' in (project / "Cargo.lock").read_text()


async def test_printed_config_file_and_ci_forms_work_with_real_cargo(
    registry: FakeRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    require_tool("cargo", "rustup or Debian package cargo")
    registry.add_crate("serde", "1.0.0")
    base = str(mirror.make_url("")).rstrip("/")
    project = tmp_path / "app"
    write_cargo_project(project, {"serde": "1"})

    # 1: stdout verbatim as CARGO_HOME/config.toml (`client-config > ~/.cargo/config.toml`).
    code, printed, err = await client_config("--url", base)
    assert (code, err) == (0, "")
    assert printed == cargo_config_snippet(base)
    home = tmp_path / "home-file"
    home.mkdir()
    (home / "config.toml").write_text(printed)
    await lock(project, [], home)

    # 2: the --ci shell, run twice into the same CARGO_HOME (a cached ~/.cargo): still one valid file.
    code, ci, err = await client_config("--url", base, "--ci")
    assert (code, err) == (0, "")
    ci_home = tmp_path / "home-ci" / "nested"
    for _ in range(2):
        code, output = await run_shell(ci, ci_home, tmp_path)
        assert code == 0, output
        assert (ci_home / "config.toml").read_text() == printed
        await lock(project, [], ci_home)

    # 3: the flag form (a comment in the CI text), with an empty CARGO_HOME.
    flags_line = next(line for line in ci.splitlines() if line.startswith("# cargo --config"))
    args = shlex.split(flags_line.removeprefix("# "))[1:-1]  # drop "cargo" and the example "build"
    await lock(project, args, tmp_path / "home-flags")
    assert registry.count("/index/se/rd/serde") == 1  # every later run was served from the mirror's cache


@pytest.mark.parametrize(
    "url",
    [
        "http://x'$(touch pwned)",
        'http://x";touch pwned;"',
        "http://x\nCRATEMIRROR_EOF\ntouch pwned",
        "ftp://x",
        "",
    ],
)
async def test_urls_that_could_escape_quoting_are_refused(url: str) -> None:
    code, out, err = await client_config("--url", url)
    assert (code, out) == (2, "")
    lines = err.splitlines()  # its own usage, then the reason (argparse's form)
    usage, message = lines[0], lines[-1]
    assert usage.startswith("usage: cratemirror client-config ")
    assert message.startswith("cratemirror client-config: error: --url: expected an http(s) URL")
    with pytest.raises(BadBaseURL):
        cargo_ci_snippet(url)


async def test_status_page_copy_texts_are_the_printed_ones_whatever_the_host_header(
    mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    base = str(mirror.make_url("")).rstrip("/")
    hostile = {
        "Host": "x'$(touch pwned)",
        "X-Forwarded-Host": 'y";touch pwned;"',
        "X-Forwarded-Proto": "$(id)",
    }
    for headers in ({}, hostile):
        page = await (await mirror.get("/", headers=headers)).text()
        texts = {
            name: html.unescape(match)
            for name, match in re.findall(r'<pre id="(cargo-config|cargo-env)">(.*?)</pre>', page, re.S)
        }
        assert texts["cargo-config"] == cargo_config_snippet(base)
        assert texts["cargo-env"] == cargo_ci_snippet(base)
        code, output = await run_shell(texts["cargo-env"], tmp_path / "home", tmp_path)
        assert code == 0, output
        assert not (tmp_path / "pwned").exists()
        assert (tmp_path / "home" / "config.toml").read_text() == cargo_config_snippet(base)
        (merge,) = re.findall(r'<code id="merge-command">(.*?)</code>', page)
        assert html.unescape(merge) == f"cratemirror client-config --url {base} --merge ~/.cargo/config.toml"


USER_CONFIG = """\
# my own cargo settings: kept by --merge
[net]
retry = 5  # flaky wifi

[alias]
b = "build"  # a shortcut

[source.mirror]
registry = "sparse+http://old-mirror.invalid/index/"  # the mirror we used before
"""


async def test_merge_updates_an_existing_cargo_config_in_place(
    registry: FakeRegistry, mirror: TestClient[Any, Any], tmp_path: Path
) -> None:
    require_tool("cargo", "rustup or Debian package cargo")
    registry.add_crate("serde", "1.0.0")
    base = str(mirror.make_url("")).rstrip("/")
    home = tmp_path / "home"
    home.mkdir()
    config = home / "config.toml"
    config.write_text(USER_CONFIG)

    for _ in range(2):  # a second merge changes nothing
        code, out, err = await client_config("--url", base, "--merge", str(config))
        assert (code, out) == (0, ""), err
        merged = config.read_text()
        for kept in (
            "# my own cargo settings: kept by --merge",
            "retry = 5  # flaky wifi",
            'b = "build"  # a shortcut',
        ):
            assert kept in merged, merged
        assert "old-mirror.invalid" not in merged
        assert merged.count("[source.mirror]") == 1 and merged.count("[source.crates-io]") == 1
    project = tmp_path / "app"
    write_cargo_project(project, {"serde": "1"})
    await lock(project, [], home)  # the real cargo reads the merged file and resolves through the mirror
    assert registry.count("/index/se/rd/serde") == 1

    fresh = tmp_path / "new-home" / "config.toml"  # missing: created, as printed
    code, _, err = await client_config("--url", base, "--merge", str(fresh))
    assert code == 0, err
    assert fresh.read_text() == cargo_config_snippet(base)

    config.write_text("[source\n")  # not TOML: refused, untouched
    code, _, err = await client_config("--url", base, "--merge", str(config))
    assert code == 2 and "does not parse" in err, err
    assert config.read_text() == "[source\n"
