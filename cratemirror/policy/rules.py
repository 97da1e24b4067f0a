"""The policy's rules, built once from `policy:` in the config, and the verdict for one version.

Order of precedence: an `allow` entry passes whatever else says; a `deny` entry blocks; an advisory that
affects the version (not withdrawn, not ignored, informational only if its kind is listed) blocks, or
warns with `advisories: warn`; a licence the allowlist does not satisfy blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cratemirror.config.schema import Config, ConfigError, PolicyConfig
from cratemirror.names import InvalidRequest, parse_name
from cratemirror.policy.advisories import Advisory, AdvisoryDb
from cratemirror.policy.licenses import Allowlist
from cratemirror.versions import CargoRequirement, RequirementError, Version

BLOCK = "block"
WARN = "warn"
LICENSE_RULE = "license"
DENY_RULE = "deny"


@dataclass(frozen=True, slots=True)
class Entry:
    """One `deny`/`allow` entry: `name` (every version) or `name@<cargo requirement>`."""

    text: str
    lower: str
    requirement: CargoRequirement | None

    @classmethod
    def parse(cls, text: str) -> Entry:
        name, at, requirement = text.strip().partition("@")
        crate = parse_name(name.strip())
        if at and not requirement.strip():
            raise RequirementError(f"nothing after '@' in {text!r}")
        return cls(text.strip(), crate.lower, CargoRequirement.parse(requirement) if at else None)

    def matches(self, lower: str, version: Version) -> bool:
        return self.lower == lower and (self.requirement is None or self.requirement.matches(version))


@dataclass(frozen=True, slots=True)
class Decision:
    rule: str  # the advisory id, "license" or "deny"
    action: str  # block | warn
    reason: str  # one line for the user: what matched and what to do


@dataclass(frozen=True, slots=True)
class Verdict:
    block: Decision | None = None
    warnings: tuple[Decision, ...] = ()


PASS = Verdict()


def _entries(values: Sequence[str], source: str, key: str) -> tuple[Entry, ...]:
    # The schema checks their shape; whether the requirement is one cargo accepts is checked here.
    entries = []
    for index, text in enumerate(values):
        try:
            entries.append(Entry.parse(text))
        except (InvalidRequest, RequirementError):
            raise ConfigError(
                f"{source}: policy.{key}[{index}]: expected a crate name or name@<cargo version requirement> "
                f"like openssl@<0.10.55, got {text!r}"
            ) from None
    return tuple(entries)


@dataclass(frozen=True)
class Rules:
    mode: str  # off | report | enforce
    advisories: str  # deny | warn
    informational: frozenset[str]
    ignore: frozenset[str]
    licenses: Allowlist
    deny: tuple[Entry, ...]
    allow: tuple[Entry, ...]
    min_release_age: float = 0.0
    cooldown_exempts_fixes: bool = True
    internal_names: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: PolicyConfig, source: str) -> Rules:
        """Validated rules; ConfigError (exit 2) naming the key for a bad entry."""
        return cls(
            mode=config.mode,
            advisories=config.advisories,
            informational=frozenset(kind.lower() for kind in config.informational),
            ignore=frozenset(config.ignore),
            licenses=Allowlist(config.licenses),
            deny=_entries(config.deny, source, "deny"),
            allow=_entries(config.allow, source, "allow"),
            min_release_age=config.min_release_age,
            cooldown_exempts_fixes=config.cooldown_exempts_fixes,
            internal_names=config.internal_names,
        )

    @property
    def enforcing(self) -> bool:
        return self.mode == "enforce"

    def allowed(self, lower: str, version: Version) -> bool:
        return any(entry.matches(lower, version) for entry in self.allow)

    def names_rules_for(self, lower: str) -> bool:
        """Whether a deny or allow entry names this crate (the index view needs a closer look)."""
        return any(entry.lower == lower for entry in (*self.deny, *self.allow))

    def verdict(
        self, db: AdvisoryDb, name: str, version: Version, license_text: str | None, license_known: bool
    ) -> Verdict:
        lower = name.lower()
        for entry in self.allow:
            if entry.matches(lower, version):
                return PASS
        shown = f"{name} {version}"
        for entry in self.deny:
            if entry.matches(lower, version):
                return _denied(shown, entry)
        block: Decision | None = None
        warnings: list[Decision] = []
        for advisory in db.for_crate(lower):
            decision = self._advisory_decision(advisory, shown, version)
            if decision is None:
                continue
            if decision.action == BLOCK and block is None:
                block = decision
            elif decision.action == WARN:
                warnings.append(decision)
        if block is None and self.licenses and license_known:
            refusal = self.licenses.refusal(license_text)
            if refusal is not None:
                block = Decision(
                    LICENSE_RULE, BLOCK,
                    f"{shown} is blocked by the mirror's licence policy: {refusal}; ask the mirror's "
                    f"operators for an allow entry ({lower}@={version}) if it may be used",
                )  # fmt: skip
        return Verdict(block, tuple(warnings))

    def unjudgeable(self, db: AdvisoryDb, name: str, text: str) -> Verdict:
        """The verdict for a version string that is not semver (the mirror's looser path rules let
        `1.0.0-01` through): fail closed. A bare-name allow passes and a bare-name deny blocks, as for
        any version; a crate that a versioned entry or an advisory names is blocked, saying why."""
        lower = name.lower()
        if any(entry.lower == lower and entry.requirement is None for entry in self.allow):
            return PASS
        shown = f"{name} {text}"
        for entry in self.deny:
            if entry.lower == lower and entry.requirement is None:
                return _denied(shown, entry)
        cannot = f"{shown} is not a semver version, so the mirror's policy cannot judge it"
        if any(entry.lower == lower for entry in self.deny):
            return Verdict(
                Decision(DENY_RULE, BLOCK, f"{cannot} against its deny list; choose another version")
            )
        for advisory in db.for_crate(lower):
            if advisory.withdrawn or advisory.id in self.ignore:
                continue
            if advisory.informational is not None and advisory.informational not in self.informational:
                continue
            return Verdict(
                Decision(
                    advisory.id, BLOCK, f"{cannot} against advisory {advisory.id}; choose another version"
                )
            )
        return PASS

    def acts_on(self, advisory: Advisory) -> bool:
        """Not withdrawn, not ignored, and informational only when its kind is listed."""
        if advisory.withdrawn or advisory.id in self.ignore:
            return False
        return advisory.informational is None or advisory.informational in self.informational

    def _advisory_decision(self, advisory: Advisory, shown: str, version: Version) -> Decision | None:
        if not self.acts_on(advisory) or not advisory.affects(version):
            return None
        what = f"{advisory.informational} advisory" if advisory.informational else "security advisory"
        title = f" ({advisory.title})" if advisory.title else ""
        if advisory.patched:
            advice = f"upgrade to a patched version ({', '.join(advisory.patched)})"
        else:
            advice = "no patched version exists: replace the crate"
        action = BLOCK if self.advisories == "deny" else WARN
        return Decision(
            advisory.id, action,
            f"{shown} is affected by {what} {advisory.id}{title}; {advice}; see https://rustsec.org/advisories/"
            f"{advisory.id}",
        )  # fmt: skip


def _denied(shown: str, entry: Entry) -> Verdict:
    return Verdict(
        Decision(
            DENY_RULE,
            BLOCK,
            f"{shown} is blocked by the mirror's deny list ({entry.text}); choose another "
            "version, or ask the mirror's operators for an allow entry",
        )
    )


def check_policy(config: Config) -> Rules:
    """The rules of a config, validated: ConfigError (exit 2) for a bad entry or advisory_db path."""
    root = config.policy.advisory_db
    if root is not None and root.exists() and not (root / "crates").is_dir():
        raise ConfigError(
            f"{config.source}: policy.advisory_db: expected a RustSec advisory-db checkout (a directory "
            f"with crates/), got {str(root)!r}"
        )
    return Rules.from_config(config.policy, config.source)
