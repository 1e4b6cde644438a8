"""/metrics: Prometheus counters of one app, summed over the worker processes when there are several.

With several workers, ``PROMETHEUS_MULTIPROC_DIR`` (set by server.run_workers before they start) makes
prometheus_client keep every value in a file there, and /metrics reads them all: a scrape answered by any
worker counts every worker's requests.

Requests are counted by ``RequestMetrics``, a plain ASGI middleware with prometheus-fastapi-instrumentator's
two main metric names and labels.  The instrumentator itself cost a sixth of a request's event-loop time
(it matches every route a second time and fills five metrics); this reads the route FastAPI matched.
"""
from __future__ import annotations

import os
import time

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
        self.requests = Counter("http_requests_total", "requests answered, by route, method and status",
                                ["handler", "method", "status"], registry=self.registry)
        self.latency = Histogram("http_request_duration_seconds", "seconds from request to answer, by route",
                                 ["handler", "method"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self.queue_depth = Gauge("nin_queue_depth", "images waiting for a forward pass", registry=self.registry,
                                 multiprocess_mode="livesum")
        self._queued = lambda: 0
        self._answered: dict[tuple, tuple] = {}

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

    def answered(self, handler: str, method: str, status: int, seconds: float) -> None:
        key = handler, method, status
        if key not in self._answered:  # labels() takes a lock and builds a key: once per kind of answer
            self._answered[key] = (self.requests.labels(handler, method, str(status)),
                                   self.latency.labels(handler, method))
        count, latency = self._answered[key]
        count.inc()
        latency.observe(seconds)

    def exposition(self) -> bytes:
        """The text a scrape gets: this app's metrics, or every worker's (several workers)."""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if not self.shared:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


class RequestMetrics:
    """ASGI middleware: each HTTP request's route template ("none" when no route matched), method, status
    and seconds into ``metrics`` (500 when the app raised); /metrics itself is not counted."""

    def __init__(self, app, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set by the router on the scope it was given
            self.metrics.answered(getattr(route, "path", "none"), scope["method"], status,
                                  time.perf_counter() - start)
