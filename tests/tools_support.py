"""Helpers for the operator-tool tests (tests/tools/); holds no tests itself.

The commands run as real subprocesses (`python -m cratemirror ...`) started with asyncio, so a fake
upstream or a mirror running in the test's event loop keeps answering while they work.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import time
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from cratemirror.cache.index import body_etag
from cratemirror.fleet.storage.disk import CrateMeta, IndexEntry, Store
from tests.fake_upstream import FakeRegistry, run_cargo, write_cargo_home, write_cargo_project
from tests.mirror_process import clean_env

CRATES_IO = "registry+https://github.com/rust-lang/crates.io-index"
CLI_TIMEOUT = 120.0


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return f"--- exit {self.code}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


async def run_cli(*args: str, cwd: Path, timeout: float = CLI_TIMEOUT) -> CliResult:  # noqa: ASYNC109
    """`python -m cratemirror ARGS` with a clean environment (no CRATEMIRROR_* leaking in)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cratemirror", *args,
        cwd=str(cwd), env=clean_env(PYTHONUNBUFFERED="1"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"cratemirror {' '.join(args)} did not finish in {timeout}s:\n{err.decode()}"
        ) from None
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


def write_config(path: Path, index_url: str, cache_dir: Path, *, max_size: str = "1GiB") -> Path:
    """A mirror.yaml for the tools: the fake upstream, a cache dir, quick retries, quiet logs."""
    path.write_text(
        "upstream:\n"
        f"  index_url: {index_url}\n"
        "  timeout: 5s\n"
        "  retries: 1\n"
        "cache:\n"
        f"  dir: {cache_dir}\n"
        f"  max_size: {max_size}\n"
        "logging:\n"
        "  level: warning\n"
    )
    return path


def mirror_url(client: TestClient[Any, Any]) -> str:
    return str(client.server.make_url("/")).rstrip("/")


def publish_sample(registry: FakeRegistry) -> dict[str, str]:
    """A small dependency graph cargo resolves to these versions (name -> version)."""
    from tests.fake_upstream import Dep

    registry.add_crate("z", "0.1.0")
    registry.add_crate("b", "0.2.0")
    registry.add_crate("b", "0.2.1+build.5")
    registry.add_crate(
        "Inflect", "0.1.0", deps=[Dep("z", "^0.1")], lib_rs="pub fn f() -> &'static str { z::hello() }\n"
    )
    registry.add_crate(
        "a", "1.0.0", deps=[Dep("b", "^0.2")], lib_rs="pub fn f() -> &'static str { b::hello() }\n"
    )
    return {"a": "1.0.0", "b": "0.2.1+build.5", "Inflect": "0.1.0", "z": "0.1.0"}


async def real_lockfile(tmp_path: Path, registry: FakeRegistry) -> Path:
    """A project depending on a and Inflect, locked by the real cargo talking to the fake upstream
    directly. Returns the project dir (its Cargo.lock is what the tools read)."""
    project, home = tmp_path / "app", tmp_path / "cargo-home-direct"
    write_cargo_home(home, registry.index_url, source_name="fake")
    write_cargo_project(project, {"a": "1", "Inflect": "0.1"})
    code, output = await run_cargo(["generate-lockfile"], project, home)
    assert code == 0, f"cargo generate-lockfile failed:\n{output}"
    return project


async def cargo_fetch_through(client: TestClient[Any, Any], project: Path, home: Path) -> None:
    """A real `cargo fetch` of the project, on a fresh CARGO_HOME pointed at the mirror."""
    write_cargo_home(home, f"{mirror_url(client)}/index/")
    code, output = await run_cargo(["fetch"], project, home)
    assert code == 0, f"cargo fetch through the mirror failed:\n{output}"
    downloaded = sorted(path.name for path in (home / "registry" / "cache").rglob("*.crate"))
    assert downloaded, output


def seed_cache(cache_dir: Path, registry: FakeRegistry, crates: dict[str, str], *, fetched_at: float) -> None:
    """Put crates (with their index files) into a cache dir through the Store API, as a fill would."""
    store = Store(cache_dir)
    try:
        for name, version in crates.items():
            body = registry.index_file(name)
            now = time.time()
            store.put_index(
                name.lower(), IndexEntry(200, body, body_etag(body), formatdate(now, usegmt=True), now)
            )
            data = registry.get_version(name, version).data
            temp = store.new_temp_file()
            temp.write_bytes(data)
            meta = CrateMeta(name, version, hashlib.sha256(data).hexdigest(), len(data), fetched_at)
            store.commit_crate(temp, meta)
    finally:
        store.close()


def crate_file(cache_dir: Path, name: str, version: str) -> Path:
    return cache_dir / "crates" / name / f"{name}-{version}.crate"
