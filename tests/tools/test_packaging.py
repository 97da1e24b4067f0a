"""The README's quick start and the install it relies on: a venv (Debian's system Python refuses a bare
`pip install`), uvloop by default where it has a wheel, and the `fast` extra kept for old commands."""

from __future__ import annotations

import re
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
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/cratemirror serve",
        "bash .ci/run",
    ]
