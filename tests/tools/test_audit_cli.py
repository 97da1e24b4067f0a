"""`cratemirror audit query|impact` as a real subprocess over an audit file: filters (crate and
requirement, who, since), the three formats, impact by advisory and by requirement, and bad input
(exit 2 with one line)."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from cratemirror.cache.audit import AUDIT_FILE, AuditDb
from tests.policy_support import LEAF_ADVISORY, synthetic_db
from tests.tools_support import run_cli

NOW = time.time()


def trail(tmp_path: Path) -> Path:
    """A cache dir with an audit file, and a config naming it and a synthetic advisory db."""
    cache = tmp_path / "cache"
    cache.mkdir()
    db = AuditDb(cache / AUDIT_FILE)
    db.append([
        (NOW - 40 * 86400, "crates-io", "leaf", "0.3.0", "served", "", "old-ci"),  # older than --since 30d
        (NOW - 3600, "crates-io", "leaf", "0.3.2", "served", "", "alice"),
        (NOW - 1800, "crates-io", "leaf", "0.3.2", "served", "", "alice"),
        (NOW - 950, "crates-io", "leaf", "0.3.2", "served", "", "10.0.0.7", 2, NOW - 900),  # 2 alike
        (NOW - 600, "crates-io", "leaf", "0.3.1", "served", "", "bob"),
        (NOW - 300, "crates-io", "leaf", "0.3.2", "blocked", LEAF_ADVISORY, "bob"),
        (NOW - 200, "crates-io", "serde", "1.0.0", "served", "", "bob"),
        (NOW - 100, "corp", "leaf", "9.9.9", "not-found", "", "bob"),
    ])  # fmt: skip
    db.close()
    advisories = synthetic_db(tmp_path / "advisory-db")
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"cache:\n  dir: {cache}\npolicy:\n  advisory_db: {advisories}\nlogging:\n  level: warning\n"
    )
    return config


async def test_query_filters_and_formats(tmp_path: Path) -> None:
    config = trail(tmp_path)
    result = await run_cli("audit", "query", "--format", "json", "--config", str(config), cwd=tmp_path)
    assert result.code == 0, result.output
    assert len(json.loads(result.stdout)) == 8  # audit.retention 90d: all of them
    result = await run_cli(
        "audit", "query", "--crate", "leaf@>=0.3.1", "--who", "bob", "--since", "30d", "--format", "csv",
        "--config", str(config), cwd=tmp_path,
    )  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(row["version"], row["result"], row["rule"]) for row in rows] == [
        ("0.3.1", "served", ""), ("0.3.2", "blocked", LEAF_ADVISORY), ("9.9.9", "not-found", ""),
    ]  # fmt: skip
    result = await run_cli("audit", "query", "--crate", "serde", "--config", str(config), cwd=tmp_path)
    lines = result.stdout.splitlines()
    columns = ["AT", "REGISTRY", "CRATE", "VERSION", "RESULT", "RULE", "WHO", "COUNT", "LAST"]
    assert lines[0].split() == columns
    assert "serde" in lines[1] and "bob" in lines[1]
    assert lines[-1].startswith("audit query: 1 records, 1 requests")


async def test_impact_by_advisory_and_by_requirement(tmp_path: Path) -> None:
    config = trail(tmp_path)
    result = await run_cli(
        "audit", "impact", LEAF_ADVISORY, "--since", "30d", "--format", "json", "--config", str(config),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    document = json.loads(result.stdout)
    assert document["clients"] == 2 and document["downloads"] == 4
    assert [(row["who"], row["version"], row["count"]) for row in document["served"]] == [
        ("10.0.0.7", "0.3.2", 2),
        ("alice", "0.3.2", 2),
    ]  # fmt: skip  (blocked, and 0.3.1 which is patched, are not exposure; old-ci is before --since)
    alice = document["served"][1]
    assert alice["first"] < alice["last"]
    table = await run_cli("audit", "impact", LEAF_ADVISORY, "--config", str(config), cwd=tmp_path)
    assert table.stdout.splitlines()[0].startswith(
        f"audit impact: {LEAF_ADVISORY} (leaf: leaf parses untrusted input unsoundly): affected versions "
        "served to 3 clients (5 downloads)"
    )  # all of audit.retention: old-ci too
    result = await run_cli(
        "audit", "impact", "--crate", "leaf@=0.3.1", "--format", "csv", "--config", str(config), cwd=tmp_path
    )
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(row["who"], row["count"]) for row in rows] == [("bob", "1")]


async def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = trail(tmp_path)
    for args, expected in (
        (["query", "--since", "lots"], "--since: expected a duration like 30d, got 'lots'"),
        (["query", "--crate", "../etc"], "--crate: expected NAME or NAME@<cargo version requirement>"),
        (["impact", "--crate", "leaf"], "--crate: expected NAME or NAME@<cargo version requirement>"),
        (["impact", "NOT-AN-ID"], "expected an advisory id like RUSTSEC-2023-0001, got 'NOT-AN-ID'"),
    ):
        result = await run_cli("audit", *args, "--config", str(config), cwd=tmp_path)
        assert result.code == 2, result.output
        # one line of reason, after the subcommand's own usage (argparse's form for a bad flag value)
        *usage, reason = result.stderr.strip().splitlines()
        assert expected in reason, result.stderr
        assert all(line.startswith(("usage: cratemirror audit", " ")) for line in usage), result.stderr
    result = await run_cli("audit", "impact", "RUSTSEC-2001-0001", "--config", str(config), cwd=tmp_path)
    assert result.code == 1 and "RUSTSEC-2001-0001 is not in policy.advisory_db" in result.stderr
