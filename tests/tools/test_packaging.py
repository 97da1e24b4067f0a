"""The README's quick start and the install it relies on: an activated venv (Debian's system Python refuses
a bare `pip install`; activated, `cratemirror` and the venv's python are on PATH for every later example
and the bench), uvloop by default where it has a wheel, and the `fast` extra kept for old commands."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_uvloop_is_a_default_dependency_where_it_exists() -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    (uvloop,) = [Requirement(text) for text in project["dependencies"] if text.startswith("uvloop")]
    assert uvloop.marker is not None
    assert uvloop.marker.evaluate({"sys_platform": "linux", "platform_python_implementation": "CPython"})
    assert not uvloop.marker.evaluate({"sys_platform": "win32", "platform_python_implementation": "CPython"})
    assert not uvloop.marker.evaluate({"sys_platform": "linux", "platform_python_implementation": "PyPy"})
    # `pip install '.[fast]'` (old docs, deploy files, .ci/run) must keep working.
    assert "fast" in project["optional-dependencies"]


def test_uvloop_is_installed_here() -> None:
    import uvloop

    assert uvloop.new_event_loop is not None


def test_readme_quick_start_uses_a_venv() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", quick_start, re.DOTALL)
    assert commands == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install . && cratemirror serve",
        "bash .ci/run",
    ]
    # What a newcomer does next, and what a CI runner needs, are said right there.
    assert "open http://127.0.0.1:8080/ and run `cratemirror client-config`" in quick_start.lower()
    assert "--host 0.0.0.0" in quick_start and "server.host: 0.0.0.0" in quick_start


def test_the_quick_start_install_is_enough_for_the_bench() -> None:
    """`python -m bench --quick` in the quick start's shell: the bench imports only the standard library,
    aiohttp and yarl besides its own and the tests' support modules, all installed by `pip install .`."""
    project = pyproject()["project"]
    assert isinstance(project, dict)
    installed = {Requirement(text).name for text in project["dependencies"]}
    assert "aiohttp" in installed  # yarl comes with it
    imported: set[str] = set()
    for path in [
        *(REPO / "bench").glob("*.py"),
        REPO / "tests" / "mirror_process.py",
        REPO / "tests" / "fake_upstream.py",
    ]:
        for line in path.read_text(encoding="utf-8").splitlines():
            match = re.match(r"(?:from|import) ([a-z_0-9]+)", line)
            if match:
                imported.add(match.group(1))
    third_party = imported - set(sys.stdlib_module_names) - {"bench", "tests", "cratemirror", "__future__"}
    assert third_party <= {"aiohttp", "yarl"}, third_party
