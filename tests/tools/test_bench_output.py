"""The benchmark never rewrites the committed results unless asked (`--write-results`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.driver import COMMITTED_RESULTS, LOCAL_RESULTS, REPO, parse_args


def test_a_run_writes_an_untracked_file_by_default() -> None:
    assert parse_args(["--quick"]).output == LOCAL_RESULTS
    assert parse_args(["--quick", "--write-results"]).output == COMMITTED_RESULTS
    assert parse_args(["--output", "/tmp/elsewhere.md"]).output == Path("/tmp/elsewhere.md")
    with pytest.raises(SystemExit) as exc:
        parse_args(["--output", "/tmp/x.md", "--write-results"])
    assert exc.value.code == 2


def test_the_default_results_file_is_ignored_by_git() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout (git)")
    relative = str(LOCAL_RESULTS.relative_to(REPO))
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", relative], check=False)
    assert ignored.returncode == 0, f"{relative} is not in .gitignore"
    tracked = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--error-unmatch", str(COMMITTED_RESULTS.relative_to(REPO))],
        capture_output=True,
        check=False,
    )
    assert tracked.returncode == 0  # the committed table is still there for --write-results
