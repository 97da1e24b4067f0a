"""A real `cargo fetch` of the 100-crate dependency tree on a fresh CARGO_HOME."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.fake_upstream import run_cargo, write_cargo_home, write_cargo_project

CARGO_TIMEOUT = 300.0


async def cargo_fetch(
    index_url: str,
    workdir: Path,
    deps: Mapping[str, str],
    expect_packages: int,
    cainfo: Path | None = None,
    prefix: Sequence[str] = (),
) -> float:
    """Seconds `cargo fetch` took (resolution + every index file + every crate); fails loudly.
    `cainfo`: the CA that signed an https front's certificate; `prefix`: a command to run cargo under."""
    home = workdir / "cargo-home"
    project = workdir / "project"
    write_cargo_home(home, index_url)
    if cainfo is not None:
        with (home / "config.toml").open("a") as config:
            config.write(f'\n[http]\ncainfo = "{cainfo}"\n')
    write_cargo_project(project, deps)
    started = time.perf_counter()
    code, output = await run_cargo(["fetch"], project, home, timeout=CARGO_TIMEOUT, prefix=prefix)
    elapsed = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"cargo fetch via {index_url} failed ({code}):\n{output[-4000:]}")
    lock = (project / "Cargo.lock").read_text()
    packages = lock.count("[[package]]")
    if packages != expect_packages:
        raise RuntimeError(f"cargo fetch resolved {packages} packages, expected {expect_packages}")
    downloaded = sum(1 for _ in (home / "registry" / "cache").glob("*/*.crate"))
    if downloaded != expect_packages - 1:  # every package but the app itself
        raise RuntimeError(f"cargo fetch stored {downloaded} crates, expected {expect_packages - 1}")
    return elapsed
