"""Thin named Celery tasks: they take only ids and hand off to `generator.pipeline`."""

from __future__ import annotations

from gateway.settings import get_settings
from generator.celery_app import RUN_GENERATION, app, worker_context
from generator.pipeline import run_with_companions


@app.task(name=RUN_GENERATION, bind=True, acks_late=True, max_retries=3, default_retry_delay=2)
def run_generation(self, job_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Run one queued job, batched with compatible queued jobs (a finished job is a no-op: redelivery is safe)."""
    try:
        return run_with_companions(worker_context(), job_id, get_settings().worker_batch_wait_ms / 1000)
    except Exception as exc:  # transient faults (database, broker) retry with backoff
        raise self.retry(exc=exc, countdown=2 ** self.request.retries) from exc
