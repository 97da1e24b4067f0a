"""Log lines about a lasting condition, rate-limited: one when it begins, then at most one per interval
with how often it happened meanwhile, and one when it ends.

A bucket that stalls for a minute, or an upstream that is down while a build asks for 800 index files,
is one condition, not 800 warnings. `LastingCondition("serving stale index files")` is kept per
condition (per process); `happened(detail)` is called at each occurrence, `ended()` when it is over.
"""

from __future__ import annotations

import logging
import time

__all__ = ["LOG_INTERVAL", "LastingCondition"]

LOG_INTERVAL = 60.0  # seconds between two lines about the same condition


class LastingCondition:
    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        level: int = logging.WARNING,
        interval: float = LOG_INTERVAL,
    ) -> None:
        self.logger = logger
        self.what = what
        self.level = level
        self.interval = interval
        self.since: float | None = None  # monotonic time it began; None while it does not hold
        self.count = 0  # occurrences since the last line
        self.total = 0  # occurrences since it began
        self._logged_at = 0.0

    @property
    def active(self) -> bool:
        return self.since is not None

    def happened(self, detail: str = "") -> bool:
        """One occurrence; True if it was logged (the first, or the first after `interval`)."""
        now = time.monotonic()
        self.total += 1
        if self.since is None:
            self.since = self._logged_at = now
            self.count = 0
            self.logger.log(self.level, "%s: %s", self.what, detail or "began")
            return True
        self.count += 1
        if now - self._logged_at < self.interval:
            return False
        self.logger.log(
            self.level, "%s for %.0fs (%d times in the last %.0fs): %s",
            self.what, now - self.since, self.count, now - self._logged_at, detail or "still",
        )  # fmt: skip
        self._logged_at, self.count = now, 0
        return True

    def ended(self, detail: str = "") -> None:
        if self.since is None:
            return
        lasted = time.monotonic() - self.since
        self.logger.log(
            self.level, "%s: over after %.1fs (%d times)%s",
            self.what, lasted, self.total, f": {detail}" if detail else "",
        )  # fmt: skip
        self.since, self.count, self.total = None, 0, 0
