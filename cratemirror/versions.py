"""Versions and requirements, the two ways the policy needs them.

* `CargoRequirement`: cargo's requirement syntax and matching rules, for `deny`/`allow` entries
  (`name@<req>`). A bare `1.2` means `^1.2`; comparators joined by `,` must all hold; a pre-release
  version matches only a requirement that names a pre-release of the same major.minor.patch. The
  matching is semantic_version's NpmSpec, whose pre-release rule and caret/tilde/wildcard/partial
  expansions are cargo's; cargo's text is translated comparator by comparator (bare -> `^`, `,` -> AND).
* `UnaffectedRange`: how the `rustsec` crate (cargo-audit) reads an advisory's `patched`/`unaffected`
  entries: each one an interval by plain semver precedence (pre-releases inside it count), with the
  same restrictions it enforces (at most one lower and one upper bound, `^`/`~`/`=` alone, no
  wildcards, no overlapping ranges). A version is vulnerable when no such interval holds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import semantic_version
from semantic_version import Version

__all__ = [
    "CargoRequirement",
    "RequirementError",
    "UnaffectedRange",
    "Version",
    "is_vulnerable",
    "parse_version",
    "unaffected_ranges",
]

MAX_REQUIREMENT_LENGTH = 200
MAX_COMPARATORS = 16

_PART = r"(?:0|[1-9][0-9]*|\*|x|X)"
_IDENT = r"[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*"
_COMPARATOR_RE = re.compile(
    rf"(?P<op>>=|<=|>|<|=|\^|~)?\s*(?P<major>{_PART})(?:\.(?P<minor>{_PART}))?(?:\.(?P<patch>{_PART}))?"
    rf"(?:-(?P<pre>{_IDENT}))?(?:\+(?P<build>{_IDENT}))?"
)
_WILD = {"*", "x", "X"}


class RequirementError(ValueError):
    """Not a requirement cargo (or, for advisories, the rustsec crate) would accept."""


def parse_version(text: str) -> Version:
    """A full semver version; build metadata dropped (it plays no part in matching)."""
    try:
        version = Version(text)
    except ValueError:
        raise RequirementError(f"not a semver version: {text!r}") from None
    return Version(
        major=version.major, minor=version.minor, patch=version.patch, prerelease=version.prerelease
    )


@dataclass(frozen=True, slots=True)
class _Comparator:
    op: str  # one of > >= < <= = ^ ~ (a bare comparator is already "^"), or "*" for a wildcard
    major: int
    minor: int | None
    patch: int | None
    pre: str
    wildcard: bool = False  # written with "*": cargo accepts it, advisories may not use it


def _comparators(text: str) -> list[_Comparator]:
    if len(text) > MAX_REQUIREMENT_LENGTH:
        raise RequirementError(f"requirement longer than {MAX_REQUIREMENT_LENGTH} characters")
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > MAX_COMPARATORS:
        raise RequirementError(f"more than {MAX_COMPARATORS} comparators in {text!r}")
    result = []
    for part in parts:
        match = _COMPARATOR_RE.fullmatch(part)
        if match is None:
            raise RequirementError(f"not a cargo version requirement: {text!r}")
        numbers = [match.group("major"), match.group("minor"), match.group("patch")]
        # A wildcard ends the version: "1.*.3" and "*.1" are not requirements.
        wild_at = next((i for i, value in enumerate(numbers) if value in _WILD), None)
        if wild_at is not None and (
            any(value is not None for value in numbers[wild_at + 1 :]) or match.group("pre")
        ):
            raise RequirementError(f"not a cargo version requirement: {text!r}")
        op = match.group("op") or "^"
        if wild_at is not None:
            if match.group("op") not in (None, "="):
                raise RequirementError(f"a wildcard cannot follow {op!r} in {text!r}")
            if wild_at == 0:
                result.append(_Comparator("*", 0, None, None, "", wildcard=True))
                continue
            op = "="  # "1.*" is "=1": every 1.x.y
            numbers = numbers[:wild_at] + [None] * (3 - wild_at)
        major, minor, patch = (None if value is None else int(value) for value in numbers)
        assert major is not None
        if match.group("pre") and patch is None:
            raise RequirementError(f"a pre-release needs a full version in {text!r}")
        result.append(_Comparator(op, major, minor, patch, match.group("pre") or "", wild_at is not None))
    return result


def _npm(comparator: _Comparator) -> str:
    if comparator.op == "*":
        return "*"
    version = ".".join(
        str(n) for n in (comparator.major, comparator.minor, comparator.patch) if n is not None
    )
    if comparator.pre:
        version += f"-{comparator.pre}"
    # npm's bare partial ("1.2") is an X-range, which is exactly cargo's "=1.2".
    return version if comparator.op == "=" else comparator.op + version


@dataclass(frozen=True)
class CargoRequirement:
    """A cargo version requirement, e.g. `1.2`, `>=1.0, <1.4`, `=0.3.1`, `~2`, `*`."""

    text: str
    _spec: semantic_version.NpmSpec

    @classmethod
    def parse(cls, text: str) -> CargoRequirement:
        npm = " ".join(_npm(comparator) for comparator in _comparators(text.strip()))
        try:
            spec = semantic_version.NpmSpec(npm)
        except ValueError:
            raise RequirementError(f"not a cargo version requirement: {text!r}") from None
        return cls(text.strip(), spec)

    def matches(self, version: Version) -> bool:
        return version in self._spec

    def __str__(self) -> str:
        return self.text


# --- advisory ranges, as the rustsec crate reads them ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _Bound:
    version: Version | None  # None: unbounded
    inclusive: bool = True


@dataclass(frozen=True, slots=True)
class UnaffectedRange:
    start: _Bound
    end: _Bound

    def contains(self, version: Version) -> bool:
        low, high = self.start, self.end
        if low.version is not None and (
            version < low.version or (version == low.version and not low.inclusive)
        ):
            return False
        return not (
            high.version is not None
            and (version > high.version or (version == high.version and not high.inclusive))
        )

    def overlaps(self, other: UnaffectedRange) -> bool:
        return _before_or_at(self.start, other.end) and _before_or_at(other.start, self.end)


def _before_or_at(start: _Bound, end: _Bound) -> bool:
    """Whether a range starting at `start` and one ending at `end` share a version."""
    if start.version is None or end.version is None:
        return True
    if start.version < end.version:
        return True
    return start.version == end.version and start.inclusive and end.inclusive


def _upper(comparator: _Comparator) -> Version:
    """The exclusive upper end of a `^` or `~` comparator, with `-0` so no pre-release of it slips in."""
    major, minor, patch = comparator.major, comparator.minor, comparator.patch
    if comparator.op == "~":
        end = (major + 1, 0, 0) if minor is None else (major, minor + 1, 0)
    elif major > 0:
        end = (major + 1, 0, 0)
    elif minor is None:
        end = (1, 0, 0)
    elif minor == 0 and patch is not None:
        end = (0, 0, patch + 1)
    else:
        end = (0, minor + 1, 0)
    return Version(major=end[0], minor=end[1], patch=end[2], prerelease=("0",))


def _as_version(comparator: _Comparator) -> Version:
    prerelease = tuple(comparator.pre.split(".")) if comparator.pre else ()
    return Version(
        major=comparator.major,
        minor=comparator.minor or 0,
        patch=comparator.patch or 0,
        prerelease=prerelease,
    )


def _unaffected_range(text: str) -> UnaffectedRange:
    comparators = _comparators(text.strip())
    if len(comparators) > 2:
        raise RequirementError(f"too many comparators in {text!r}")
    start = end = _Bound(None)
    for comparator in comparators:
        if comparator.wildcard:
            raise RequirementError(f"wildcards are not allowed in advisory ranges: {text!r}")
        version = _as_version(comparator)
        if comparator.op in (">", ">="):
            if start.version is not None:
                raise RequirementError(f"more than one lower bound in {text!r}")
            start = _Bound(version, comparator.op == ">=")
        elif comparator.op in ("<", "<="):
            if end.version is not None:
                raise RequirementError(f"more than one upper bound in {text!r}")
            end = _Bound(version, comparator.op == "<=")
        elif comparator.op in ("=", "^", "~"):
            if len(comparators) != 1:
                raise RequirementError(f"{comparator.op!r} must stand alone in {text!r}")
            start = _Bound(version)
            end = _Bound(version) if comparator.op == "=" else _Bound(_upper(comparator), inclusive=False)
        else:
            raise RequirementError(f"unsupported operator in {text!r}")
    if not _before_or_at(start, end):
        raise RequirementError(f"empty range {text!r}")
    return UnaffectedRange(start, end)


def unaffected_ranges(requirements: list[str]) -> tuple[UnaffectedRange, ...]:
    """The advisory's `patched` + `unaffected` entries as intervals; RequirementError if rustsec
    would reject them (bad syntax, or two ranges that overlap)."""
    ranges = [_unaffected_range(text) for text in requirements]
    for index, first in enumerate(ranges):
        for second in ranges[index + 1 :]:
            if first.overlaps(second):
                raise RequirementError("overlapping version ranges in the advisory")
    return tuple(ranges)


def is_vulnerable(version: Version, ranges: tuple[UnaffectedRange, ...]) -> bool:
    """No patched or unaffected interval holds it (no intervals at all: every version is affected)."""
    return not any(interval.contains(version) for interval in ranges)
