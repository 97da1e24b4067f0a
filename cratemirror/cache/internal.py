"""policy.internal_names: crate names that exist only inside, never asked of crates.io.

A lookup of `acme-billing` on crates.io would tell the world the name exists inside, and a public crate
of that name is how a dependency-confusion attack starts. On the crates.io registry these names answer
404 at once (index file and download; nothing is asked upstream, nothing cached is served); private
registries serve them as before. Matching follows crates.io's name rules: `-` and `_` are the same and
case does not matter, in the name and in the glob alike (`acme-*` also matches `ACME_billing`).
"""

from __future__ import annotations

import fnmatch
import logging
import re

from cachetools import TTLCache

log = logging.getLogger("cratemirror.policy")

INTERNAL_RULE = "internal"
LOG_EVERY = 3600.0  # seconds: one log line per name per worker in this time


def _normal(text: str) -> str:
    return text.lower().replace("_", "-")


class InternalNames:
    def __init__(self, globs: tuple[str, ...]) -> None:
        self.globs = globs
        joined = "|".join(f"(?:{fnmatch.translate(_normal(glob))})" for glob in globs)
        self._regex = re.compile(joined) if globs else None
        self._logged: TTLCache[str, bool] = TTLCache(4096, LOG_EVERY)

    def __bool__(self) -> bool:
        return self._regex is not None

    def matches(self, name: str) -> bool:
        return self._regex is not None and self._regex.match(_normal(name)) is not None

    def refuse(self, name: str) -> None:
        """Log (once in a while per name) that an internal name was kept from crates.io."""
        lower = _normal(name)
        if lower in self._logged:
            return
        self._logged[lower] = True
        log.info(
            "internal name %s asked of crates.io: answered 404, upstream not asked (policy.internal_names)",
            name, extra={"fields": {"crate": name, "rule": INTERNAL_RULE}},
        )  # fmt: skip
