"""Prometheus metrics of the gateway process."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

# team and model are bounded: teams of the API keys, models of the registry (never a name taken from a request).
REQUESTS = Counter("gateway_http_requests_total", "HTTP requests", ["method", "route", "status", "team", "model"])
LATENCY = Histogram("gateway_http_request_seconds", "HTTP request latency", ["method", "route"])
DECISIONS = Counter("gateway_decisions_total", "Policy decisions", ["stage", "action", "team", "model"])
JOBS = Gauge("gateway_jobs", "Jobs by status (queued = queue depth); absent while the database cannot be read",
             ["status"])
JOBS_UP = Gauge("gateway_jobs_up", "1 if the last scrape could count the jobs in the database, else 0")
STAGE_SECONDS = Histogram("gateway_stage_seconds", "Pipeline stage latency", ["stage"])

WORKER_PREFIX = "worker_"  # the series generator.pipeline records where jobs run


def observe_request(method: str, route: str, status: int, seconds: float, *, team: str = "", model: str = "") -> None:
    REQUESTS.labels(method, route, str(status), team, model).inc()
    LATENCY.labels(method, route).observe(seconds)


def observe_decision(stage: str, action: str, team: str, model: str) -> None:
    DECISIONS.labels(stage, action, team, model).inc()


class _WithoutWorkerSeries:
    """The process's metrics less the worker's: a distributed gateway runs no jobs, so they would read zero."""

    def collect(self) -> Iterable[Metric]:
        return [family for family in REGISTRY.collect() if not family.name.startswith(WORKER_PREFIX)]


_DISTRIBUTED = CollectorRegistry(auto_describe=False)
_DISTRIBUTED.register(_WithoutWorkerSeries())


def exposition(*, embedded: bool) -> bytes:
    """The /metrics body: the embedded gateway runs the worker in-process and exports its series too; distributed
    workers export theirs on LLAMAGEN_GATEWAY_WORKER_METRICS_PORT."""
    return generate_latest(REGISTRY if embedded else _DISTRIBUTED)
