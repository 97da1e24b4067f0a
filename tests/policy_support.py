"""A synthetic RustSec advisory-db in the real on-disk format, and the small crate tree the policy
tests publish: `top 1.1.0 -> mid 0.2 -> leaf 0.3`, whose newest leaf (0.3.2) is vulnerable again after
0.3.1 fixed it, plus crates whose Cargo.toml declares GPL-only and dual MIT/GPL licences."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tests.fake_upstream import Dep, FakeRegistry

# leaf: 0.2.9 predates the bug (unaffected), 0.3.0 has it, 0.3.1 fixed it (patched), 0.3.2 regressed.
LEAF_ADVISORY = "RUSTSEC-2099-0001"
WITHDRAWN_ADVISORY = "RUSTSEC-2099-0002"  # against every leaf version, but withdrawn: never applies
UNMAINTAINED_ADVISORY = "RUSTSEC-2099-0003"  # informational: mid is unmaintained
LICENCES = ("MIT", "Apache-2.0")


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{value}"' for value in values) + "]"


def write_advisory(
    db: Path,
    crate: str,
    advisory_id: str,
    *,
    patched: Sequence[str] = (),
    unaffected: Sequence[str] = (),
    informational: str | None = None,
    withdrawn: str | None = None,
    title: str = "Flaw in the crate allows bad things",
    date: str = "2099-01-02",
) -> Path:
    """One advisory file exactly as rustsec/advisory-db lays them out."""
    lines = [
        "```toml",
        "[advisory]",
        f'id = "{advisory_id}"',
        f'package = "{crate}"',
        f'date = "{date}"',
        'url = "https://example.invalid/advisory"',
        'categories = ["memory-corruption"]',
        'keywords = ["test"]',
    ]
    if informational is not None:
        lines.append(f'informational = "{informational}"')
    if withdrawn is not None:
        lines.append(f'withdrawn = "{withdrawn}"')
    lines += ["", "[versions]", f"patched = {_toml_list(patched)}"]
    if unaffected:
        lines.append(f"unaffected = {_toml_list(unaffected)}")
    lines += ["```", "", f"# {title}", "", "Affected versions of this crate did X.", ""]
    path = db / "crates" / crate / f"{advisory_id}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def synthetic_db(db: Path) -> Path:
    write_advisory(
        db, "leaf", LEAF_ADVISORY, patched=["=0.3.1"], unaffected=["< 0.3.0"],
        title="leaf parses untrusted input unsoundly",
    )  # fmt: skip
    write_advisory(db, "leaf", WITHDRAWN_ADVISORY, withdrawn="2099-02-01", title="filed in error")
    write_advisory(
        db, "mid", UNMAINTAINED_ADVISORY, informational="unmaintained", title="mid is unmaintained"
    )
    return db


def publish_policy_tree(registry: FakeRegistry) -> None:
    for version in ("0.2.9", "0.3.0", "0.3.1", "0.3.2"):
        registry.add_crate("leaf", version)
    registry.add_crate("mid", "0.2.0", deps=[Dep("leaf", "^0.3")])
    registry.add_crate("top", "1.0.0")
    registry.add_crate("top", "1.1.0", deps=[Dep("mid", "^0.2")])
    registry.add_crate("gplonly", "1.0.0", license="GPL-3.0-only")
    registry.add_crate("dual", "1.0.0", license="MIT OR GPL-3.0")
