"""Request metrics are added up in the worker and written to the metric values in batches (issue 24):
once per event-loop iteration and before every scrape, with the same buckets, sums and counts as one
observe() per request."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Histogram

from cratemirror.metrics import LATENCY_BUCKETS, Metrics

# Bucket bounds themselves (an observation equal to a bound falls in that bucket), between them, beyond.
SECONDS = [0.0001, 0.00005, 0.001, 0.0011, 0.25, 0.2500001, 60.0, 61.0, 0.0, 3.0]


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(labels.items())): value
        for labels, value in metrics.snapshot().series(name)
        if labels.get("kind") == "index"
    }


async def test_batched_observations_equal_one_observe_each() -> None:
    metrics = Metrics()
    reference = Histogram("reference", "", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    for seconds in SECONDS:
        metrics.observe_request("index", "hit", seconds, 100)
        reference.observe(seconds)
    metrics.observe_request("index", "miss", 0.5, 0)
    reference.observe(0.5)

    # Not yet written: the batch goes out after this loop iteration (or at the scrape, next).
    pending = metrics._request_duration.labels("index", "crates-io")._sum.get()
    assert pending == 0
    buckets = samples(metrics, "cratemirror_request_duration_seconds_bucket")
    expected = {
        sample.labels["le"]: sample.value
        for sample in next(iter(reference.collect())).samples
        if sample.name == "reference_bucket"
    }
    assert {dict(labels)["le"]: value for labels, value in buckets.items()} == expected
    assert sum(samples(metrics, "cratemirror_request_duration_seconds_sum").values()) == sum(SECONDS) + 0.5
    snapshot = metrics.snapshot()
    assert snapshot.value("cratemirror_cache_requests_total", kind="index", result="hit") == len(SECONDS)
    assert snapshot.value("cratemirror_cache_requests_total", kind="index", result="miss") == 1
    assert snapshot.value("cratemirror_bytes_served_total", kind="index") == 100 * len(SECONDS)


async def test_a_batch_is_written_after_the_loop_iteration() -> None:
    metrics = Metrics()
    metrics.observe_request("crate", "hit", 0.002, 10)
    child = metrics._cache_requests.labels("crate", "hit", "crates-io")
    assert child._value.get() == 0
    await asyncio.sleep(0)  # one loop iteration: the flush the request scheduled runs
    assert child._value.get() == 1


def test_without_an_event_loop_the_values_are_written_at_once() -> None:
    metrics = Metrics()
    metrics.observe_request("config", "hit", 0.002, 10)
    assert metrics._cache_requests.labels("config", "hit", "crates-io")._value.get() == 1
