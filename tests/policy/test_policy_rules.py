"""The policy's pure parts: cargo's requirement rules, the rustsec reading of advisory ranges, the
advisory-db reader on hostile input, SPDX licences, the Cargo.toml reader, rules and the index view."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from cratemirror.config.load import load_config
from cratemirror.config.schema import ConfigError, PolicyConfig
from cratemirror.policy import advisories
from cratemirror.policy.licenses import MAX_MANIFEST_BYTES, Allowlist, read_license
from cratemirror.policy.rules import BLOCK, WARN, Rules, check_policy
from cratemirror.policy.view import mark_yanked
from cratemirror.versions import CargoRequirement, RequirementError, parse_version, unaffected_ranges
from tests.fake_upstream import REAL_INDEX, make_crate_tarball
from tests.policy_support import (
    LEAF_ADVISORY,
    UNMAINTAINED_ADVISORY,
    WITHDRAWN_ADVISORY,
    synthetic_db,
    write_advisory,
)

# From cargo's "Specifying Dependencies" (caret, tilde, wildcard, comparison, multiple requirements)
# and the semver crate's pre-release rule: (requirement, version, matches).
CARGO_CASES = [
    ("1.2.3", "1.2.3", True), ("1.2.3", "1.9.9", True), ("1.2.3", "2.0.0", False), ("1.2.3", "1.2.2", False),
    ("1.2", "1.2.0", True), ("1.2", "1.99.0", True), ("1.2", "1.1.9", False), ("1", "1.0.0", True),
    ("1", "1.99.99", True), ("1", "2.0.0", False), ("0.2.3", "0.2.3", True), ("0.2.3", "0.2.99", True),
    ("0.2.3", "0.3.0", False), ("0.2", "0.2.0", True), ("0.2", "0.3.0", False), ("0.0.3", "0.0.3", True),
    ("0.0.3", "0.0.4", False), ("0.0", "0.0.99", True), ("0.0", "0.1.0", False), ("0", "0.99.0", True),
    ("0", "1.0.0", False), ("^1.2.3", "1.9.0", True), ("~1.2.3", "1.2.9", True), ("~1.2.3", "1.3.0", False),
    ("~1.2", "1.2.0", True), ("~1.2", "1.3.0", False), ("~1", "1.99.0", True), ("~1", "2.0.0", False),
    ("*", "0.0.1", True), ("1.*", "1.5.0", True), ("1.*", "2.0.0", False), ("1.2.*", "1.2.7", True),
    ("1.2.*", "1.3.0", False), (">= 1.2.0", "1.2.0", True), ("> 1", "1.9.0", False), ("> 1", "2.0.0", True),
    ("< 2", "1.99.0", True), ("< 2", "2.0.0", False), ("=1.2.3", "1.2.3", True), ("=1.2.3", "1.2.4", False),
    ("=1.2", "1.2.9", True), ("<= 1.2", "1.2.9", True), (">= 1.2, < 1.5", "1.4.9", True),
    (">= 1.2, < 1.5", "1.5.0", False), (">= 1.2, < 1.5", "1.1.0", False),
    # A pre-release matches only a requirement naming a pre-release of the same major.minor.patch.
    ("1.2.3", "1.3.0-beta", False), ("1", "2.0.0-alpha", False), (">=1.2.3-alpha", "1.2.3-beta", True),
    (">=1.2.3-alpha", "1.2.4-beta", False), ("^1.2.3-rc.1", "1.2.3-rc.2", True), ("*", "1.0.0-rc1", False),
]  # fmt: skip


@pytest.mark.parametrize(("requirement", "version", "expected"), CARGO_CASES)
def test_cargo_requirement_rules(requirement: str, version: str, expected: bool) -> None:
    assert CargoRequirement.parse(requirement).matches(parse_version(version)) is expected


@pytest.mark.parametrize(
    "text", ["", "1.2.3.4", "^", "a.b", ">=1,", "1.*.3", ">1.*", "=*-pre", "1.2-pre", "~>1"]
)
def test_bad_cargo_requirements(text: str) -> None:
    with pytest.raises(RequirementError):
        CargoRequirement.parse(text)


def test_advisory_ranges_as_rustsec_reads_them() -> None:
    # RUSTSEC-2020-0071 (time): patched >= 0.2.23, and 0.2.0 to 0.2.6 were never affected.
    ranges = unaffected_ranges([">= 0.2.23", *[f"=0.2.{n}" for n in range(7)]])
    vulnerable = {version: advisories.is_vulnerable(parse_version(version), ranges) for version in (
        "0.1.44", "0.2.0", "0.2.6", "0.2.7", "0.2.22", "0.2.23", "0.3.0", "0.2.23-rc1", "0.3.0-alpha",
    )}  # fmt: skip
    assert vulnerable == {
        "0.1.44": True, "0.2.0": False, "0.2.6": False, "0.2.7": True, "0.2.22": True, "0.2.23": False,
        "0.3.0": False, "0.2.23-rc1": True, "0.3.0-alpha": False,  # plain precedence, unlike cargo
    }  # fmt: skip
    # ^ and ~ end just below the next breaking version's first pre-release.
    caret = unaffected_ranges(["^1.2.3"])
    assert not advisories.is_vulnerable(parse_version("1.9.0-beta"), caret)
    assert advisories.is_vulnerable(parse_version("2.0.0-alpha"), caret)
    assert advisories.is_vulnerable(parse_version("1.0.0"), ())  # no ranges: every version


@pytest.mark.parametrize(
    "ranges", [[">= 1.0", ">= 1.5"], ["1.*"], ["> 1, < 2, < 3"], [">= 1, >= 2"], ["^1, < 3"], ["< 1, > 2"]]
)
def test_advisory_ranges_rustsec_rejects(ranges: list[str]) -> None:
    with pytest.raises(RequirementError):
        unaffected_ranges(ranges)


def test_synthetic_db_reads_like_cargo_audit(tmp_path: Path) -> None:
    db = advisories.load(synthetic_db(tmp_path / "db"))
    assert db.count == 3 and not db.errors
    assert db.newest_date == "2099-01-02"
    assert {advisory.id for advisory in db.for_crate("LEAF")} == {LEAF_ADVISORY, WITHDRAWN_ADVISORY}
    rules = Rules.from_config(PolicyConfig(mode="enforce"), "test")
    verdicts = {
        version: rules.verdict(db, "leaf", parse_version(version), None, False).block
        for version in ("0.2.9", "0.3.0", "0.3.1", "0.3.2")
    }
    assert {version: block.rule if block else None for version, block in verdicts.items()} == {
        "0.2.9": None,
        "0.3.0": LEAF_ADVISORY,
        "0.3.1": None,
        "0.3.2": LEAF_ADVISORY,
    }  # fmt: skip  (the withdrawn advisory, against every version, never applies)
    block = verdicts["0.3.2"]
    assert block is not None and block.action == BLOCK
    assert "upgrade to a patched version (=0.3.1)" in block.reason
    assert "leaf parses untrusted input unsoundly" in block.reason
    # Informational advisories act only when their kind is listed.
    assert rules.verdict(db, "mid", parse_version("0.2.0"), None, False).block is None
    listed = Rules.from_config(PolicyConfig(mode="enforce", informational=("unmaintained",)), "test")
    mid = listed.verdict(db, "mid", parse_version("0.2.0"), None, False).block
    assert mid is not None and mid.rule == UNMAINTAINED_ADVISORY
    assert "no patched version exists" in mid.reason
    # Ignored ids never act; `advisories: warn` warns instead of blocking.
    ignoring = Rules.from_config(PolicyConfig(mode="enforce", ignore=(LEAF_ADVISORY,)), "test")
    assert ignoring.verdict(db, "leaf", parse_version("0.3.2"), None, False).block is None
    warning = Rules.from_config(PolicyConfig(mode="enforce", advisories="warn"), "test")
    verdict = warning.verdict(db, "leaf", parse_version("0.3.2"), None, False)
    assert verdict.block is None and [w.action for w in verdict.warnings] == [WARN]
    assert WITHDRAWN_ADVISORY not in {w.rule for w in verdict.warnings}


def test_hostile_advisory_db_entries_are_left_out(tmp_path: Path) -> None:
    db = synthetic_db(tmp_path / "db")
    crates = db / "crates"
    (crates / "bad name").mkdir()
    write_advisory(tmp_path / "elsewhere", "x", "RUSTSEC-2099-0009")
    (crates / "bad name" / "RUSTSEC-2099-0010.md").write_text(
        (tmp_path / "elsewhere/crates/x/RUSTSEC-2099-0009.md").read_text()
    )
    (crates / "leaf" / "RUSTSEC-99-1.md").write_text("not an advisory name: never opened")
    (crates / "leaf" / "RUSTSEC-2099-0011.md").symlink_to(
        tmp_path / "elsewhere/crates/x/RUSTSEC-2099-0009.md"
    )
    (crates / "leaf" / "RUSTSEC-2099-0012.md").write_text("```toml\n[advisory\n```\n")
    (crates / "leaf" / "RUSTSEC-2099-0013.md").write_text(
        "```toml\n" + "#" * advisories.MAX_ADVISORY_BYTES + "\n```"
    )
    write_advisory(db, "leaf", "RUSTSEC-2099-0014", patched=[">= 1", ">= 2"])
    wrong = write_advisory(db, "mid", "RUSTSEC-2099-0015")
    wrong.rename(crates / "leaf" / "RUSTSEC-2099-0015.md")  # says package = "mid"
    loaded = advisories.load(db)
    assert loaded.count == 3
    assert len(loaded.errors) == 4, loaded.errors
    assert any("0012" in error and "TOML" in error for error in loaded.errors)
    assert any("0013" in error and "larger than" in error for error in loaded.errors)
    assert any("0014" in error and "overlapping" in error for error in loaded.errors)
    assert any("0015" in error and "crate directory" in error for error in loaded.errors)


LICENCE_CASES = [
    ("MIT OR GPL-3.0", True), ("GPL-3.0-only", False), ("MIT/Apache-2.0", True), ("GPL-3.0/MIT", True),
    ("mit", True), ("MIT AND GPL-3.0-only", False), ("Apache-2.0 WITH LLVM-exception", True),
    ("(MIT OR Apache-2.0) AND BSD-3-Clause", False), ("MIT AND (Apache-2.0 OR GPL-2.0)", True),
    ("LicenseRef-Proprietary", False), ("MIT OR", False), ("", False), (None, False),
]  # fmt: skip


@pytest.mark.parametrize(("expression", "allowed"), LICENCE_CASES)
def test_licence_expressions(expression: str | None, allowed: bool) -> None:
    assert (Allowlist(["MIT", "Apache-2.0"]).refusal(expression) is None) is allowed


def test_deprecated_spdx_ids_are_their_successors() -> None:
    assert Allowlist(["GPL-3.0"]).refusal("GPL-3.0-only") is None
    assert Allowlist(["GPL-3.0-or-later"]).refusal("GPL-3.0+") is None


def _tarball(members: list[tuple[str, bytes, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, kind, content in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(content) if kind == tarfile.REGTYPE else 0
            if kind == tarfile.SYMTYPE:
                info.linkname = content.decode()
            tar.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)
    return gzip.compress(raw.getvalue())


def test_licence_from_the_crates_cargo_toml() -> None:
    data = make_crate_tarball("Foo", "1.0.0", license="GPL-3.0-only")
    assert read_license(io.BytesIO(data), "Foo", "1.0.0") == "GPL-3.0-only"
    assert read_license(io.BytesIO(make_crate_tarball("Foo", "1.0.0", license=None)), "Foo", "1.0.0") is None
    manifest = b'[package]\nname = "foo"\nlicense = "MIT"\n'
    assert (
        read_license(
            io.BytesIO(_tarball([("foo-1.0.0/Cargo.toml", tarfile.REGTYPE, manifest)])), "foo", "1.0.0"
        )
        == "MIT"
    )


@pytest.mark.parametrize(
    "data",
    [
        b"not gzip at all",
        gzip.compress(b"gzip, but not a tar"),
        _tarball([("foo-1.0.0/Cargo.toml", tarfile.REGTYPE, b"[package\nlicense = 'MIT'")]),  # bad TOML
        _tarball([("foo-1.0.0/Cargo.toml", tarfile.REGTYPE, b"\xff\xfe")]),  # not UTF-8
        _tarball([("foo-1.0.0/Cargo.toml", tarfile.SYMTYPE, b"/etc/passwd")]),
        _tarball([("other-1.0.0/Cargo.toml", tarfile.REGTYPE, b'[package]\nlicense = "MIT"\n')]),
        _tarball(
            [
                (
                    "foo-1.0.0/Cargo.toml",
                    tarfile.REGTYPE,
                    b'[package]\nlicense = "MIT"\n' + b"#" * MAX_MANIFEST_BYTES,
                )
            ]
        ),
        _tarball([("foo-1.0.0/Cargo.toml", tarfile.REGTYPE, b'[package]\nlicense = ["MIT"]\n')]),
    ],
    ids=["not-gzip", "not-tar", "bad-toml", "not-utf8", "symlink", "other-name", "oversized", "not-a-string"],
)
def test_hostile_crates_have_no_licence(data: bytes) -> None:
    assert read_license(io.BytesIO(data), "foo", "1.0.0") is None


def test_deny_and_allow_entries(tmp_path: Path) -> None:
    db = advisories.load(synthetic_db(tmp_path / "db"))
    rules = Rules.from_config(
        PolicyConfig(mode="enforce", deny=("openssl@<0.10.55", "left-pad"), allow=("leaf@=0.3.2",)), "test"
    )
    assert rules.verdict(db, "OpenSSL", parse_version("0.10.54"), None, False).block is not None
    assert rules.verdict(db, "openssl", parse_version("0.10.55"), None, False).block is None
    block = rules.verdict(db, "left-pad", parse_version("9.9.9"), None, False).block
    assert block is not None and block.rule == "deny" and "left-pad" in block.reason
    # allow passes whatever else says: the advisory, here.
    assert rules.verdict(db, "leaf", parse_version("0.3.2"), None, False) == rules.verdict(
        db, "leaf", parse_version("0.3.1"), None, False
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("deny", "bad name@1"),
        ("allow", "serde@"),
        ("deny", "serde@>>1"),  # the schema's pattern lets these through; the policy's parser does not
        ("deny", "serde@1.2.3.4"),
        ("allow", "serde@1.*.3"),
        ("ignore", "CVE-2020-1"),
        ("informational", "boring"),
        ("licenses", "MIT OR GPL"),
    ],
)
def test_bad_policy_entries_name_the_key(tmp_path: Path, key: str, value: str) -> None:
    path = tmp_path / "mirror.yaml"
    path.write_text(f"policy:\n  {key}: [{json.dumps(value)}]\n")
    with pytest.raises(ConfigError) as caught:
        check_policy(load_config(path, {}))
    message = str(caught.value)
    assert message.startswith(f"{path}: policy.{key}[0]: expected"), message
    assert "\n" not in message


def test_index_view_changes_only_the_blocked_line() -> None:
    body = (REAL_INDEX / "se/rd/serde").read_bytes()
    lines = body.split(b"\n")
    target = next(i for i, line in enumerate(lines) if b'"vers":"1.0.100"' in line)
    yanked_already = next(i for i, line in enumerate(lines) if b'"yanked":true' in line)
    version_of = json.loads(lines[yanked_already])["vers"]
    shown = mark_yanked(body, {"1.0.100", version_of})
    after = shown.split(b"\n")
    assert len(after) == len(lines)
    changed = [i for i, (old, new) in enumerate(zip(lines, after, strict=True)) if old != new]
    assert changed == [target]
    assert after[target] == lines[target].replace(b'"yanked":false', b'"yanked":true')
    assert json.loads(after[target]) == {**json.loads(lines[target]), "yanked": True}
    # A line spaced differently (another registry) is still edited minimally.
    spaced = b'{"name": "x", "vers": "1.0.0", "yanked": false}\n'
    assert mark_yanked(spaced, {"1.0.0"}) == b'{"name": "x", "vers": "1.0.0", "yanked":true}\n'
    # A line without the key gets it.
    assert json.loads(mark_yanked(b'{"name":"x","vers":"1.0.0"}', {"1.0.0"}))["yanked"] is True


# The front matter of the real RUSTSEC-2020-0071 (rustsec/advisory-db, public domain), as on disk.
REAL_ADVISORY = """```toml
[advisory]
id = "RUSTSEC-2020-0071"
package = "time"
date = "2020-11-18"
url = "https://github.com/time-rs/time/issues/293"
categories = ["code-execution", "memory-corruption"]
cvss = "CVSS:3.1/AV:L/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H"
keywords = ["segfault"]
aliases = ["CVE-2020-26235"]

[affected]
# any Unix-like OS
os = ["linux", "redox", "solaris", "android", "ios", "macos", "netbsd", "openbsd", "freebsd"]
[affected.functions]
"time::at" = ["^0.1"]
"time::UtcOffset::local_offset_at" = ["< 0.2.23"]

[versions]
patched = [">= 0.2.23"]
unaffected = ["=0.2.0", "=0.2.1", "=0.2.2", "=0.2.3", "=0.2.4", "=0.2.5", "=0.2.6"]
```

# Potential segfault in the time crate

### Impact
"""


def test_a_real_advisory_file(tmp_path: Path) -> None:
    path = tmp_path / "db" / "crates" / "time" / "RUSTSEC-2020-0071.md"
    path.parent.mkdir(parents=True)
    path.write_text(REAL_ADVISORY)
    db = advisories.load(tmp_path / "db")
    assert not db.errors and db.count == 1
    (advisory,) = db.for_crate("time")
    assert (advisory.title, advisory.date, advisory.informational) == (
        "Potential segfault in the time crate", "2020-11-18", None,
    )  # fmt: skip
    rules = Rules.from_config(PolicyConfig(mode="enforce"), "test")
    blocked = [
        version for version in ("0.1.44", "0.2.0", "0.2.6", "0.2.7", "0.2.22", "0.2.23", "0.3.36")
        if rules.verdict(db, "time", parse_version(version), None, False).block is not None
    ]  # fmt: skip
    assert blocked == ["0.1.44", "0.2.7", "0.2.22"]
