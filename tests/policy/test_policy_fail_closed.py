"""Issue 18: the policy fails closed and says so. One unreadable advisory file is left out (logged,
counted) while the rest loads, also in a served 2-worker process; a version the policy cannot parse is
blocked in enforce mode with a reason, and a bare-name deny matches every version string."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from cratemirror.policy import advisories
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path
from tests.mirror_process import MirrorProcess, metric_value
from tests.policy_support import LEAF_ADVISORY, publish_policy_tree, synthetic_db, write_advisory

ADVISORY_ERRORS = "cratemirror_policy_advisory_errors_total"


def _nested_advisory(db: Path, levels: int = 50_000) -> Path:
    """A file named like an advisory whose front matter nests `levels` arrays deep."""
    path = write_advisory(db, "mid", "RUSTSEC-2099-0042")
    text = path.read_text().replace('keywords = ["test"]', "x = " + "[" * levels + "]" * levels)
    path.write_text(text)
    assert path.stat().st_size < advisories.MAX_ADVISORY_BYTES  # refused for its depth, not its size
    return path


def test_a_deeply_nested_advisory_is_left_out_and_the_rest_loads(tmp_path: Path) -> None:
    db = synthetic_db(tmp_path / "db")
    _nested_advisory(db)
    loaded = advisories.load(db)
    assert loaded.count == 3 and loaded.failed == 1
    assert any("0042" in error and "nested" in error for error in loaded.errors), loaded.errors
    assert LEAF_ADVISORY in {advisory.id for advisory in loaded.for_crate("leaf")}


async def test_a_two_worker_server_starts_with_a_nested_advisory(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    publish_policy_tree(registry)
    db = synthetic_db(tmp_path / "db")
    _nested_advisory(db)
    env = {"CRATEMIRROR_POLICY_MODE": "enforce", "CRATEMIRROR_POLICY_ADVISORY_DB": str(db)}
    async with (
        MirrorProcess(registry.index_url, tmp_path / "cache", tmp_path, workers=2, env=env) as mirror,
        aiohttp.ClientSession() as session,
    ):
        # The valid advisories apply on every worker (10 fresh connections spread over both).
        for _ in range(10):
            async with session.get(f"{mirror.url}/api/v1/crates/leaf/0.3.2/download") as response:
                assert response.status == 403
                assert response.headers["X-Cratemirror-Policy"] == LEAF_ADVISORY
        async with session.get(f"{mirror.url}/api/v1/crates/leaf/0.3.1/download") as response:
            assert response.status == 200
        async with session.get(f"{mirror.url}/metrics") as response:
            assert metric_value(await response.text(), ADVISORY_ERRORS) >= 1
    output = mirror.output()
    assert "Traceback" not in output and "RecursionError" not in output
    assert "advisory file left out: mid/RUSTSEC-2099-0042.md" in output


@pytest.mark.parametrize("version", ["1.0.0-01", "2.0.0-00.1"])  # the mirror takes them; semver does not
async def test_a_version_the_policy_cannot_parse_is_blocked(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path, version: str
) -> None:
    registry.add_crate("evil", "1.0.0")
    registry.add_crate("evil", version)
    registry.add_crate("leaf", "0.3.0")
    registry.add_crate("leaf", version)
    registry.add_crate("fine", "1.0.0")
    registry.add_crate("fine", version)
    db = synthetic_db(tmp_path / "db")
    mirror = await mirror_factory(policy__mode="enforce", policy__advisory_db=db, policy__deny=["evil"])
    denied = await mirror.get(f"/api/v1/crates/evil/{version}/download")
    assert denied.status == 403 and denied.headers["X-Cratemirror-Policy"] == "deny"
    assert "deny list (evil)" in await denied.text()
    # leaf has an advisory the version cannot be judged against: blocked, saying why.
    unjudged = await mirror.get(f"/api/v1/crates/leaf/{version}/download")
    assert unjudged.status == 403, await unjudged.text()
    assert "cannot judge" in await unjudged.text()
    # The index view yanks them too, so new resolutions avoid them.
    for name in ("evil", "leaf"):
        body = await (await mirror.get(f"/index/{index_path(name)}")).read()
        lines = {line["vers"]: line["yanked"] for line in map(json.loads, body.splitlines())}
        assert lines[version] is True, (name, lines)
    # The good path: a crate nothing names is served whatever its version string.
    fine = await mirror.get(f"/api/v1/crates/fine/{version}/download")
    assert fine.status == 200
    assert (await mirror.get("/api/v1/crates/leaf/0.3.0/download")).status == 403  # the advisory
