"""Thin named Celery tasks: they take only ids and hand off to `generator.pipeline`."""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded

from gateway.settings import get_settings
from generator.celery_app import RUN_GENERATION, app, worker_context
from generator.pipeline import RunInterrupted, fail_jobs, job_error, run_with_companions


@app.task(name=RUN_GENERATION, bind=True, acks_late=True, max_retries=3, default_retry_delay=2)
def run_generation(self, job_id: str, reclaim: list[str] | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    """Run one queued job, batched with compatible queued jobs (a finished job is a no-op: redelivery is safe).

    Transient faults (database, broker, artifact store) retry with backoff; a retry takes back the jobs the
    interrupted try had leased (`reclaim`). A job past the soft time limit fails, saying so.
    """
    settings = get_settings()
    ctx = worker_context()
    try:
        return run_with_companions(ctx, job_id, settings.worker_batch_wait_ms / 1000, reclaim or ())
    except RunInterrupted as exc:
        if isinstance(exc.__cause__, SoftTimeLimitExceeded):
            fail_jobs(ctx, exc.job_ids, job_error(exc.__cause__))
            return []
        raise self.retry(exc=exc, countdown=2 ** self.request.retries,
                         kwargs={"job_id": job_id, "reclaim": exc.job_ids}) from exc
    except SoftTimeLimitExceeded:  # before anything was leased: the sweeper re-sends the job
        return []
    except Exception as exc:
        raise self.retry(exc=exc, countdown=2 ** self.request.retries) from exc
