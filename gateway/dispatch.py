"""Hands accepted jobs to a worker: Celery (distributed) or an in-process worker thread (embedded).

Both end in the same plain functions, `generator.pipeline.sample_jobs` and `release_run` (which `run_jobs`
calls in turn); only settings choose which.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gateway.settings import Settings
from generator.pipeline import PipelineContext, SampledRun, release_run, sample_jobs

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    def submit(self, job_id: str) -> None: ...

    def close(self) -> None: ...

    def ping(self) -> None: ...

    def workers(self) -> list[dict[str, Any]]: ...


# How often a worker waiting for companions re-reads `pending` (a request refused, not queued, ends the wait).
PENDING_POLL_S = 0.005


class LocalWorker:
    """Embedded mode: one background thread drains the queue, batching up to `batch_size` jobs per run.

    The thread blocks on the queue (a submitted job wakes it at once), takes the jobs already queued, and
    waits at most `batch_wait_s` for more only while `pending()` (requests being screened, not yet queued)
    is above zero; without `pending` it always waits. `on_finished` is called with each batch's job ids once
    they are released (it wakes long-polling requests).

    A second thread releases (screens, signs, stores, audits) each sampling run while the first samples the
    next: the sampler keeps its core busy instead of waiting for the release of the run before.
    """

    def __init__(self, ctx: PipelineContext, *, batch_size: int, batch_wait_s: float,
                 on_finished: Callable[[Sequence[str]], None] | None = None,
                 pending: Callable[[], int] | None = None) -> None:
        self._ctx = ctx
        self._on_finished = on_finished
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_s
        self._pending = pending
        self._queue: queue.Queue[str | None] = queue.Queue()
        # Sampled runs, then the batch they came from (None: stop). At most one waits while another is being
        # released: the sampler never gets further ahead than that.
        self._sampled: queue.Queue[SampledRun | list[str] | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._loop, name="embedded-worker", daemon=True)
        self._releaser = threading.Thread(target=self._release_loop, name="embedded-releaser", daemon=True)
        self._releaser.start()
        self._thread.start()

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def ping(self) -> None:
        if not (self._thread.is_alive() and self._releaser.is_alive()):
            raise RuntimeError("the embedded worker thread has stopped")

    def workers(self) -> list[dict[str, Any]]:
        return [{"host": "in-process", "pid": os.getpid(), "models": self._ctx.sampler.loaded(),
                 "alive": self._thread.is_alive() and self._releaser.is_alive()}]

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until every submitted job was run (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._releaser.join(timeout=30)

    def _finished(self, batch: Sequence[str]) -> None:
        if self._on_finished is None:
            return
        try:
            self._on_finished(batch)
        except Exception:  # waiters re-read their jobs periodically anyway
            log.exception("could not notify the requests waiting for jobs %s", list(batch))

    def _companion_wait(self, deadline: float) -> float:
        """How long to block for the next job: 0 (take only what is queued) once the deadline has passed or
        no request is on its way to the queue."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return 0.0
        if self._pending is None:
            return remaining
        return min(remaining, PENDING_POLL_S) if self._pending() > 0 else 0.0

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                self._sampled.put(None)
                return
            batch = [first]
            deadline = time.monotonic() + self._batch_wait_s
            stop = False
            while len(batch) < self._batch_size:
                wait_s = self._companion_wait(deadline)
                try:
                    item = self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
                except queue.Empty:
                    if wait_s > 0:
                        continue  # still before the deadline: look at `pending` again
                    break
                if item is None:
                    stop = True
                    self._queue.task_done()
                    break
                batch.append(item)
            try:
                for run in sample_jobs(self._ctx, batch)[1]:
                    self._sampled.put(run)
            except Exception:  # a database fault here leaves the jobs queued; they are logged, not lost
                log.exception("embedded worker could not run jobs %s", batch)
            finally:
                self._sampled.put(batch)  # after its runs: the releaser reports the batch done
            if stop:
                self._sampled.put(None)
                return

    def _release_loop(self) -> None:
        while (item := self._sampled.get()) is not None:
            if isinstance(item, list):
                self._finished(item)
                for _ in item:
                    self._queue.task_done()
                continue
            try:
                release_run(self._ctx, item)
            except Exception:  # the database is down: the jobs stay leased until the sweeper re-sends them
                log.exception("embedded worker could not release jobs %s", item.job_ids)


class CeleryDispatcher:
    """Distributed mode: send the job id to the `gpu` queue; any Celery worker runs it."""

    def __init__(self, settings: Settings) -> None:
        from generator.celery_app import make_celery

        if not settings.broker_url:
            raise ValueError("the distributed dispatcher needs a broker URL")
        self._app = make_celery(settings)  # the given settings, not the environment's
        self._broker_url = settings.broker_url

    def submit(self, job_id: str) -> None:
        from generator.celery_app import GPU_QUEUE, RUN_GENERATION

        self._app.send_task(RUN_GENERATION, args=[job_id], queue=GPU_QUEUE)

    def ping(self) -> None:
        with self._app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def workers(self) -> list[dict[str, Any]]:
        from generator.celery_app import registered_workers

        return registered_workers(self._broker_url)

    def close(self) -> None:
        self._app.close()
