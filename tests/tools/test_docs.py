"""README is the front page and docs/ holds the reference: every page README promises exists (or is one
another change is adding), every relative link resolves, and the configuration page names every key."""

from __future__ import annotations

import re
from pathlib import Path

from cratemirror.config.load import schema_keys

REPO = Path(__file__).resolve().parents[2]
PAGES = (
    "configuration", "operator-tools", "access", "policy", "http", "behaviour", "security", "fleet",
    "benchmarks",
)  # fmt: skip
# Linked from README, written by the changes that add their features.
COMING = {"docs/toolchains.md", "docs/audit.md", "docs/failure-modes.md", "docs/architecture.md"}
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def links(path: Path) -> list[tuple[str, str]]:
    return [(target, anchor or "") for target, anchor in LINK.findall(path.read_text(encoding="utf-8"))]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation dropped, spaces to dashes."""
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            found.add("#" + re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return found


def test_readme_is_a_front_page_that_links_every_reference_page() -> None:
    readme = REPO / "README.md"
    lines = readme.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 200, "README is the front page: reference belongs in docs/"
    targets = {target for target, _ in links(readme)}
    for page in PAGES:
        assert (REPO / "docs" / f"{page}.md").is_file(), page
        assert f"docs/{page}.md" in targets, page
    assert targets >= COMING


def test_every_relative_link_resolves() -> None:
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target, anchor in links(path):
            if re.match(r"[a-z]+:", target):
                continue  # http(s)://, mailto:
            resolved = (path.parent / target).resolve()
            relative = str(resolved.relative_to(REPO))
            if relative in COMING and not resolved.exists():
                continue
            assert resolved.exists(), f"{path.name}: {target}"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved), f"{path.name}: {target}{anchor}"


def test_the_configuration_page_names_every_key() -> None:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    text += (REPO / "docs" / "fleet.md").read_text(encoding="utf-8")
    missing = []
    for dotted, _ in schema_keys():
        key = dotted.rsplit(".", 1)[-1]
        if not any(form in text for form in (f"`{dotted}`", f"`{key}`", f"{key}`", f"`{key}:")):
            missing.append(dotted)
    assert missing == []


def test_every_test_file_the_docs_cite_exists() -> None:
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for cited in re.findall(r"tests/[\w/]+\.py", path.read_text(encoding="utf-8")):
            assert (REPO / cited).is_file(), f"{path.name}: {cited}"
