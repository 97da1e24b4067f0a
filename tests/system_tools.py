"""The system tools tests drive for real (cargo, rustup, haproxy, redis-server, chromium, ...).

A tool missing on a developer's machine skips the test with a reason naming the tool and where it comes
from; in CI (CI=true, where .ci/run installs every tool) a missing tool fails the test instead, so a
broken install step can never pass as a run of skips."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(tool: str, source: str) -> str:
    """The tool's path, or a skip (a failure in CI) naming the tool and `source` (where to get it)."""
    path = shutil.which(tool)
    if path is None:
        reason = f"{tool} is not on PATH ({source}; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path
