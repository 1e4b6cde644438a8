"""/metrics: Prometheus counters of one app, summed over the worker processes when there are several.

With several workers, ``PROMETHEUS_MULTIPROC_DIR`` (set by server.run_workers before they start) makes
prometheus_client keep every value in a file there, and /metrics (prometheus-fastapi-instrumentator)
reads them all: a scrape answered by any worker counts every worker's requests.
"""
from __future__ import annotations

import os

MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"


class ServeMetrics:
    """Batch sizes, forward-pass seconds, refused requests by reason, images waiting."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.shared = MULTIPROC in os.environ
        # one registry per app: several apps in one process (tests) never share counters
        self.registry = CollectorRegistry()
        self.batch_size = Histogram("nin_batch_size", "images per forward pass", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.infer_seconds = Histogram("nin_inference_seconds", "seconds per forward pass (a whole batch)",
                                       registry=self.registry,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.errors = Counter("nin_request_errors", "refused requests by reason", ["reason"], registry=self.registry)
        self.queue_depth = Gauge("nin_queue_depth", "images waiting for a forward pass", registry=self.registry,
                                 multiprocess_mode="livesum")
        self._queued = lambda: 0

    def watch_queue(self, queued) -> None:
        """``queued()``: images waiting now; read at each scrape, or after each batch with several workers
        (a value in a shared file cannot be a function)."""
        self._queued = queued
        if not self.shared:
            self.queue_depth.set_function(queued)

    def refused(self, reason: str) -> None:
        self.errors.labels(reason).inc()

    def batch(self, n: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.infer_seconds.observe(seconds)
        if self.shared:
            self.queue_depth.set(self._queued())
