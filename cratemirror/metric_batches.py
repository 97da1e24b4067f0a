"""Client-request counts added up in the worker and written to the (multiprocess) metric values in
batches: once per event-loop iteration, and before every scrape of this worker.

In multiprocess mode every `inc` of a prometheus_client value takes a lock, checks the process id (a
`getpid` system call) and writes the shared file; a request used to do that five times (duration sum,
its bucket, the request count, the bytes). Here a request adds to plain numbers in memory, and the
iteration's requests reach the files in one write per value. Flushing within the same loop iteration's
aftermath keeps the figures exact for any scrape that follows an answer, in this worker or another.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

# A request's pre-bound children: (duration histogram, requests counter, bytes-served counter).
Children = tuple[Any, Any, Any]


class _Pending:
    __slots__ = ("buckets", "count", "seconds", "sent")

    def __init__(self, buckets: int) -> None:
        self.count = 0
        self.seconds = 0.0
        self.sent = 0
        self.buckets = [0] * buckets


def _bounds(histogram: Any) -> Sequence[float] | None:
    """The child's bucket bounds if its values can be added to in bulk (prometheus_client keeps one
    value per bucket, counted non-cumulatively, plus the sum), else None: observe one by one."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    if bounds is None or buckets is None or not hasattr(histogram, "_sum") or len(bounds) != len(buckets):
        return None
    return tuple(bounds)


class RequestBatch:
    """One per worker process (module-level BATCH); every Metrics view adds to it."""

    def __init__(self) -> None:
        self._pending: dict[Children, _Pending] = {}
        self._bounds: dict[int, Sequence[float] | None] = {}
        self._scheduled = False

    def add(self, children: Children, seconds: float, sent: int) -> None:
        duration = children[0]
        key = id(duration)
        bounds = self._bounds.get(key, ())
        if bounds == ():
            bounds = self._bounds[key] = _bounds(duration)
        if bounds is None:  # not batchable: straight to the values
            duration.observe(seconds)
            children[1].inc()
            if sent:
                children[2].inc(sent)
            return
        pending = self._pending.get(children)
        if pending is None:
            pending = self._pending[children] = _Pending(len(bounds))
        pending.count += 1
        pending.seconds += seconds
        pending.sent += sent
        pending.buckets[bisect_left(bounds, seconds)] += 1  # the first bound >= seconds, as observe()
        if not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:  # no event loop (a tool, a test): write now
                self.flush()

    def flush(self) -> None:
        """Write what was added since the last flush (cheap when there is nothing)."""
        self._scheduled = False
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for (duration, requests, served), numbers in pending.items():
            duration._sum.inc(numbers.seconds)
            for index, count in enumerate(numbers.buckets):
                if count:
                    duration._buckets[index].inc(count)
            requests.inc(numbers.count)
            if numbers.sent:
                served.inc(numbers.sent)


BATCH = RequestBatch()
