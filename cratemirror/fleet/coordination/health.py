"""What coordination needs of an upstream's health, so the fleet layer need not import the upstream layer."""

from __future__ import annotations

from typing import Protocol


class UpstreamHealth(Protocol):
    """The upstream client's breaker (upstream.client.Health), as seen by the replicas' shared view."""

    @property
    def is_up(self) -> bool: ...

    adopted: bool  # down because another replica said so
    last_failure_at: float  # wall clock
    last_error: str | None

    def adopt_down(self, reason: str, failed_at: float) -> None: ...
