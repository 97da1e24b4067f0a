"""/readyz's verdict (cache/readiness.py): disk trouble is "degraded" (200: answers are passed through
uncached); only a replica that cannot answer at all (disk failing and offline) is not ready (503)."""

from __future__ import annotations

import logging

import pytest

from cratemirror.cache.readiness import ReadinessWatch
from cratemirror.fleet.storage.disk import DiskTrouble


@pytest.mark.parametrize("offline", [False, True])
async def test_disk_trouble_is_degraded_unless_offline(
    offline: bool, caplog: pytest.LogCaptureFixture
) -> None:
    trouble = DiskTrouble()
    watch = ReadinessWatch({}, trouble, offline)
    assert (await watch.verdict()).text() == "ready\n"
    with caplog.at_level(logging.CRITICAL):
        trouble.report("cannot write x 1.0.0 to the cache: [Errno 28] No space left on device")
    verdict = await watch.verdict()
    assert verdict.ready is not offline
    if offline:
        assert verdict.text().startswith("not ready: ") and "offline" in verdict.text()
    else:
        assert verdict.text().startswith("degraded: ") and "passed through uncached" in verdict.text()
