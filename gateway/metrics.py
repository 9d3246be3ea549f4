"""Prometheus metrics of the gateway process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("gateway_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("gateway_http_request_seconds", "HTTP request latency", ["method", "route"])
DECISIONS = Counter("gateway_decisions_total", "Policy decisions", ["stage", "action", "team", "model"])
JOBS = Gauge("gateway_jobs", "Jobs by status (queued = queue depth)", ["status"])
STAGE_SECONDS = Histogram("gateway_stage_seconds", "Pipeline stage latency", ["stage"])


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    REQUESTS.labels(method, route, str(status)).inc()
    LATENCY.labels(method, route).observe(seconds)


def observe_decision(stage: str, action: str, team: str, model: str) -> None:
    DECISIONS.labels(stage, action, team, model).inc()
