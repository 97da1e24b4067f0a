"""Prometheus instruments, named as in the contract (dashboards and alerts depend on these names).

With several worker processes, `cratemirror serve` sets PROMETHEUS_MULTIPROC_DIR before this module is
imported; prometheus_client then keeps values in shared files and /metrics sums them over workers.
Gauges are not summed: the cache gauges describe one shared disk and upstream_up one upstream, so the
most recent value written by a live worker wins (`livemostrecent`; a dead worker's gauge file is removed
by serve.py's mark_process_dead, while its counters stay in the sums so totals never go backwards).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from cratemirror.metric_batches import BATCH
from cratemirror.names import DEFAULT_REGISTRY

# From warm hits (a few hundred microseconds) to multi-second upstream fetches.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

# The *_created series double every counter and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

KINDS = ("index", "crate", "config", "toolchain", "search")
RESULTS = ("hit", "miss", "revalidated", "stale", "negative", "error")
AUTH_REASONS = ("missing", "unknown", "expired", "revoked")


@dataclass
class RequestTiming:
    """When a client request started (perf_counter: uvloop's loop.time() only has milliseconds) and the
    upstream time spent on its behalf (to response headers, over all attempts)."""

    started: float
    upstream_seconds: float = 0.0
    upstream_requests: int = 0


# Set per client request by the middleware. Fetch tasks a request starts copy its context, so their
# upstream calls add to the request that started them (a request that joins a fetch adds nothing).
_CURRENT_TIMING: ContextVar[RequestTiming | None] = ContextVar("request_timing", default=None)


def start_request_timing() -> RequestTiming:
    """Start timing the client request running in the current context."""
    timing = RequestTiming(time.perf_counter())
    _CURRENT_TIMING.set(timing)
    return timing


class _UpstreamHistogram(Histogram):
    """The upstream latency histogram; each observation also counts toward the current request."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        super().observe(amount, exemplar)
        timing = _CURRENT_TIMING.get()
        if timing is not None:
            timing.upstream_seconds += amount
            timing.upstream_requests += 1


@dataclass(frozen=True)
class Snapshot:
    """Every sample of one collection, summed over workers: what /metrics showed at that moment."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        """The sum over the series whose labels include `labels` (every registry unless one is named)."""
        return self.total(name, **labels)

    def series(self, name: str) -> Iterator[tuple[dict[str, str], float]]:
        for (sample, labels), value in self.samples.items():
            if sample == name:
                yield dict(labels), value

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(
            value for (sample, have), value in self.samples.items() if sample == name and wanted <= have
        )


class Labelled:
    """A collector with a `kind` label whose trailing `registry` label is already filled in, so the
    services label by kind alone and each registry's bundle counts under its own name."""

    __slots__ = ("metric", "registry")

    def __init__(self, metric: Any, registry: str) -> None:
        self.metric = metric
        self.registry = registry

    def labels(self, *values: str) -> Any:
        return self.metric.labels(*values, self.registry)


class _NoGauge:
    """upstream_up describes crates.io (the contract gives it no labels); an extra registry's health
    shows on the status page instead."""

    def set(self, value: float) -> None:
        pass


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry_name = DEFAULT_REGISTRY
        self._request_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        r = self.registry
        self._cache_requests = Counter(
            "cratemirror_cache_requests_total", "Client requests by kind and cache result",
            ["kind", "result", "registry"], registry=r,
        )  # fmt: skip
        self._request_duration = Histogram(
            "cratemirror_request_duration_seconds", "Client request latency",
            ["kind", "registry"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._upstream_requests = Counter(
            "cratemirror_upstream_requests_total", "Upstream requests by kind and HTTP status",
            ["kind", "status", "registry"], registry=r,
        )  # fmt: skip
        self._upstream_duration = _UpstreamHistogram(
            "cratemirror_upstream_request_duration_seconds", "Upstream request latency",
            ["kind", "registry"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.checksum_failures = Counter(
            "cratemirror_checksum_failures_total", "Crates whose sha256 did not match the index", registry=r
        )
        self._coalesced = Counter(
            "cratemirror_coalesced_requests_total", "Requests that joined an in-flight fetch",
            ["kind", "registry"], registry=r,
        )  # fmt: skip
        self._cache_size = Gauge(
            "cratemirror_cache_size_bytes", "Bytes in the cache", ["kind", "registry"], registry=r,
            multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self._cache_entries = Gauge(
            "cratemirror_cache_entries", "Entries in the cache", ["kind", "registry"], registry=r,
            multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self._cache_max_size = Gauge(
            "cratemirror_cache_max_size_bytes", "The configured bound (cache/toolchains.max_size)",
            ["kind", "registry"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self._bytes_served = Counter(
            "cratemirror_bytes_served_total", "Body bytes sent to clients", ["kind", "registry"], registry=r
        )
        self._upstream_bytes = Counter(
            "cratemirror_upstream_bytes_total", "Body bytes received from upstream", ["kind", "registry"],
            registry=r,
        )  # fmt: skip
        self._storage_integrity_failures = Counter(
            "cratemirror_storage_integrity_failures_total",
            "Objects read from shared storage that failed authentication or their hash", ["kind", "registry"],
            registry=r,
        )  # fmt: skip
        self.upstream_up: Gauge | _NoGauge = Gauge(
            "cratemirror_upstream_up", "1 while the upstream answers, 0 after consecutive failures",
            registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.upstream_up.set(1)
        self.coordination_up = Gauge(
            "cratemirror_coordination_up",
            "1 while fills are coordinated as configured (Redis reachable), 0 while coalescing per replica",
            registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.coordination_up.set(1)
        self.storage_up = Gauge(
            "cratemirror_storage_up", "1 while the shared storage (bucket) answers, 0 while it is degraded",
            registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self.storage_up.set(1)
        self.auth_failures = Counter(
            "cratemirror_auth_failures_total", "Requests refused for want of a valid token", ["reason"],
            registry=r,
        )  # fmt: skip
        for reason in AUTH_REASONS:
            self.auth_failures.labels(reason)
        self.policy_decisions = Counter(
            "cratemirror_policy_decisions_total", "Policy decisions by action and rule", ["action", "rule"],
            registry=r,
        )  # fmt: skip
        self.advisory_exposure = Gauge(
            "cratemirror_advisory_exposure",
            "Clients served a version the advisory affects, within audit.retention",
            ["advisory"], registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        # Beyond the contract (issue 18): what a broken input left out, never silently.
        self.advisory_errors = Counter(
            "cratemirror_policy_advisory_errors_total", "Advisory files left out: unreadable", registry=r
        )
        self.tokens_file_errors = Counter(
            "cratemirror_auth_tokens_file_errors_total", "Reads of a broken tokens file (old set kept)",
            registry=r,
        )  # fmt: skip
        self._bind(DEFAULT_REGISTRY)

    def _bind(self, name: str) -> None:
        self.registry_name = name
        self.cache_requests = Labelled(self._cache_requests, name)
        self.request_duration = Labelled(self._request_duration, name)
        self.upstream_requests = Labelled(self._upstream_requests, name)
        self.upstream_duration = Labelled(self._upstream_duration, name)
        self.coalesced = Labelled(self._coalesced, name)
        self.cache_size = Labelled(self._cache_size, name)
        self.cache_entries = Labelled(self._cache_entries, name)
        self.cache_max_size = Labelled(self._cache_max_size, name)
        self.bytes_served = Labelled(self._bytes_served, name)
        self.upstream_bytes = Labelled(self._upstream_bytes, name)
        self.storage_integrity_failures = Labelled(self._storage_integrity_failures, name)
        # Pre-create label sets so dashboards see every series (at 0) from the first scrape; a request's
        # three children are bound once here, not looked up per request.
        for kind in KINDS:
            for result in RESULTS:
                self._request_children[(kind, result)] = (
                    self.request_duration.labels(kind),
                    self.cache_requests.labels(kind, result),
                    self.bytes_served.labels(kind),
                )
            self.request_duration.labels(kind)
            self.coalesced.labels(kind)
            self.bytes_served.labels(kind)
        for kind in ("index", "crate"):
            self.cache_size.labels(kind)
            self.cache_entries.labels(kind)
            self.upstream_bytes.labels(kind)
            self.upstream_duration.labels(kind)
            self.storage_integrity_failures.labels(kind)

    def for_registry(self, name: str) -> Metrics:
        """The same collectors, counting under `registry=name` (one view per registry bundle)."""
        if name == self.registry_name:
            return self
        view = copy.copy(self)
        view._request_children = {}
        view.upstream_up = _NoGauge()
        view._bind(name)
        return view

    def observe_request(self, kind: str, result: str, seconds: float, body_bytes: int) -> None:
        """One finished client request of the index, download or config routes."""
        children = self._request_children.get((kind, result))
        if children is None:  # labels() costs a lock and a tuple per call: resolve each pair once
            children = self._request_children[(kind, result)] = (
                self.request_duration.labels(kind),
                self.cache_requests.labels(kind, result),
                self.bytes_served.labels(kind),
            )
        BATCH.add(children, seconds, body_bytes)  # written to the shared values once per loop iteration

    def _aggregated(self) -> CollectorRegistry:
        """This process's registry, or in multiprocess mode one that sums the files of all workers."""
        multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not multiproc_dir:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
        return registry

    def render(self) -> bytes:
        """The text exposition: summed over all workers in multiprocess mode."""
        BATCH.flush()
        return bytes(generate_latest(self._aggregated()))

    def snapshot(self) -> Snapshot:
        """The same figures as render(), as numbers (for the status page)."""
        BATCH.flush()
        return Snapshot(dict(_samples(self._aggregated())))


def _samples(registry: CollectorRegistry) -> Iterator[tuple[tuple[str, frozenset[tuple[str, str]]], float]]:
    for family in registry.collect():
        for sample in family.samples:
            yield (sample.name, frozenset(sample.labels.items())), sample.value
