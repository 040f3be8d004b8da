"""Prometheus metrics of the service (``GET /metrics``, text exposition format).

Metrics (one registry per app, so several apps in one process do not clash):

* ``medinfer_http_requests_total{method, route, status}`` counter;
* ``medinfer_http_request_duration_seconds{method, route}`` histogram (seconds);
* ``medinfer_job_queue_length`` gauge: jobs waiting (status ``queued``);
* ``medinfer_jobs_running`` gauge: jobs being processed;
* ``medinfer_jobs_total{outcome}`` counter: ``succeeded | failed | cancelled``;
* ``medinfer_predictions_total{outcome}`` counter: synchronous ``/v1/predict`` calls.

``route`` is the route template (``/api/v1/inference/{job_id}``), never the raw path,
so label cardinality stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_Scope = dict[str, Any]
_ASGIApp = Callable[..., Any]


class ServiceMetrics:
    """The metric objects of one app, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("medinfer_http_requests_total", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "medinfer_http_request_duration_seconds", "HTTP request latency (s)",
            ["method", "route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.queue_length = Gauge("medinfer_job_queue_length", "Jobs waiting in the queue",
                                  registry=self.registry)
        self.jobs_running = Gauge("medinfer_jobs_running", "Jobs being processed",
                                  registry=self.registry)
        self.jobs = Counter("medinfer_jobs_total", "Finished jobs by outcome", ["outcome"],
                            registry=self.registry)
        self.predictions = Counter("medinfer_predictions_total",
                                   "Synchronous predictions by outcome", ["outcome"],
                                   registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware counting HTTP requests and their latency per route."""

    def __init__(self, app: _ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: _Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def _send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, path, str(status["code"])).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - start)
