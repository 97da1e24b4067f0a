"""Prometheus instruments, named as in the contract (dashboards and alerts depend on these names).

With several worker processes, `cratemirror serve` sets PROMETHEUS_MULTIPROC_DIR before this module is
imported; prometheus_client then keeps values in shared files and /metrics sums them over workers.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# From sub-millisecond warm hits to multi-second upstream fetches.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

# The *_created series double every counter and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

KINDS = ("index", "crate", "config")
RESULTS = ("hit", "miss", "revalidated", "stale", "negative", "error")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.cache_requests = Counter(
            "cratemirror_cache_requests_total", "Client requests by kind and cache result",
            ["kind", "result"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "cratemirror_request_duration_seconds", "Client request latency",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_requests = Counter(
            "cratemirror_upstream_requests_total", "Upstream requests by kind and HTTP status",
            ["kind", "status"], registry=r,
        )  # fmt: skip
        self.upstream_duration = Histogram(
            "cratemirror_upstream_request_duration_seconds", "Upstream request latency",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.checksum_failures = Counter(
            "cratemirror_checksum_failures_total", "Crates whose sha256 did not match the index", registry=r
        )
        self.coalesced = Counter(
            "cratemirror_coalesced_requests_total", "Requests that joined an in-flight fetch", ["kind"],
            registry=r,
        )  # fmt: skip
        self.cache_size = Gauge(
            "cratemirror_cache_size_bytes", "Bytes in the cache", ["kind"], registry=r,
            multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.cache_entries = Gauge(
            "cratemirror_cache_entries", "Entries in the cache", ["kind"], registry=r,
            multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.bytes_served = Counter(
            "cratemirror_bytes_served_total", "Body bytes sent to clients", ["kind"], registry=r
        )
        self.upstream_bytes = Counter(
            "cratemirror_upstream_bytes_total", "Body bytes received from upstream", ["kind"], registry=r
        )
        self.upstream_up = Gauge(
            "cratemirror_upstream_up", "1 while the upstream answers, 0 after consecutive failures",
            registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.upstream_up.set(1)
        # Pre-create label sets so dashboards see every series (at 0) from the first scrape.
        for kind in KINDS:
            for result in RESULTS:
                self.cache_requests.labels(kind, result)
            self.request_duration.labels(kind)
            self.coalesced.labels(kind)
            self.bytes_served.labels(kind)
        for kind in ("index", "crate"):
            self.cache_size.labels(kind)
            self.cache_entries.labels(kind)
            self.upstream_bytes.labels(kind)
            self.upstream_duration.labels(kind)

    def render(self) -> bytes:
        """The text exposition: summed over all workers in multiprocess mode."""
        multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if multiproc_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))
