"""Thin named Celery tasks: they take only ids and hand off to `generator.pipeline`."""

from __future__ import annotations

from generator.celery_app import RUN_GENERATION, app, worker_context
from generator.pipeline import run_jobs


@app.task(name=RUN_GENERATION, bind=True, acks_late=True, max_retries=3, default_retry_delay=2)
def run_generation(self, job_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Run one queued job (a finished job is a no-op, so redelivery is safe)."""
    try:
        return run_jobs(worker_context(), [job_id])
    except Exception as exc:  # transient faults (database, broker) retry with backoff
        raise self.retry(exc=exc, countdown=2 ** self.request.retries) from exc
