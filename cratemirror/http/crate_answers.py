"""Prepared answers for warm small-crate hits: the bytes of a stored crate the app's path just served,
kept in the worker's memory for the hit lane (`hit_lane.py`) to send again without a stat, an open, a
pread and a close per request.

Only crates.io's crates up to ONE_WRITE_MAX (the ones the app's path sends in one write anyway), only
from the store (a hit), only GET. The bytes are exactly the stored file's, with the same headers, so
the lane answers as the app's path would. An answer is used for CRATE_ANSWER_SECONDS at most, then the
app's path serves the crate again (and makes a new answer): so a crate pruned, evicted or found bad by
`verify --fix` is gone from the lane within that time, and the store still sees the crate used (its
recency for eviction). With the policy on, an answer is made only for a version the policy passes
without a word (no warning, no block, no licence to read), and is used for POLICY_RECHECK_SECONDS at
most and only while the policy is unchanged, as index answers are.

Bounded by a quarter of `cache.memory_size` per worker, least recently used out first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cachetools import LRUCache
from multidict import CIMultiDict

from cratemirror.http.index_answers import POLICY_RECHECK_SECONDS, Wire
from cratemirror.policy.service import PolicyService

CRATE_ANSWER_SECONDS = 60.0
_OVERHEAD = 512


@dataclass(frozen=True, slots=True)
class DownloadAsked:
    """A download request's registry, crate and version, as the path gave them (validated before any
    answer but a 400)."""

    registry: str
    name: str
    version: str


@dataclass(slots=True)
class CrateAnswer:
    wire: Wire
    asked: DownloadAsked  # for the audit trail
    valid_until: float  # monotonic
    policy_changes: int

    def size(self) -> int:
        return len(self.wire.body) + _OVERHEAD


class CrateAnswers:
    """One per worker, keyed by the request path (`/api/v1/crates/<name>/<version>/download`)."""

    def __init__(self, budget: int) -> None:
        self._answers: LRUCache[str, CrateAnswer] = LRUCache(budget, getsizeof=CrateAnswer.size)

    def get(self, path: str, policy_changes: int) -> CrateAnswer | None:
        answer = self._answers.get(path)
        if answer is not None and (
            answer.policy_changes != policy_changes or time.monotonic() >= answer.valid_until
        ):
            return None
        return answer

    def remember(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        policy: PolicyService,
        asked: DownloadAsked,
    ) -> None:
        """Keep a stored crate's answer, if the policy passes it without a word (see the module doc)."""
        if not self._answers.maxsize:
            return
        changes = policy.changes  # read before the verdict: a change meanwhile makes the answer stale
        lifetime = CRATE_ANSWER_SECONDS
        name, version = asked.name, asked.version
        if policy.enabled:
            if policy.needs_license(name, version):
                return
            verdict = policy.verdict(name, version)
            if verdict.block is not None or verdict.warnings:
                return
            lifetime = POLICY_RECHECK_SECONDS
        answer = CrateAnswer(Wire(CIMultiDict(headers), body), asked, time.monotonic() + lifetime, changes)
        with contextlib.suppress(ValueError):  # larger than the whole budget: not kept
            self._answers[path] = answer
