"""What a download service asks of a gate (the policy), so the cache layer need not import the policy."""

from __future__ import annotations

from typing import BinaryIO, Protocol


class Refusal(Protocol):
    """Why a gate refuses a version: the rule (advisory id, `license`, `deny`, ...) and one line."""

    @property
    def rule(self) -> str: ...

    @property
    def reason(self) -> str: ...


class Gate(Protocol):
    """The policy as the crate service uses it (policy.service.PolicyService satisfies it)."""

    def blocks(self, name: str, version: str) -> bool:
        """Whether name and version alone block (a licence not yet known passes here); nothing recorded."""
        ...

    def needs_license(self, name: str, version: str) -> bool:
        """Whether the licence rule needs the crate's Cargo.toml, not yet read."""
        ...

    async def learn_license(self, name: str, version: str, crate: BinaryIO) -> None: ...

    async def judge(self, name: str, version: str, client: str) -> Refusal | None:
        """Decide for `client` with what is known now, count and log it; the refusal, if it blocks."""
        ...
