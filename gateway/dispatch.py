"""Hands accepted jobs to a worker: Celery (distributed) or an in-process worker thread (embedded).

Both end in the same plain functions, `generator.pipeline.claim_jobs`, `sample_run` and `release_run` (which
`run_jobs` calls in turn); only settings choose which.
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
from generator.pipeline import PipelineContext, SampledRun, claim_jobs, release_run, sample_run

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    def submit(self, job_id: str) -> None: ...

    def close(self) -> None: ...

    def ping(self) -> None: ...

    def workers(self) -> list[dict[str, Any]]: ...


# How often a worker waiting for companions re-reads `pending` (a request refused, not queued, ends the wait).
PENDING_POLL_S = 0.005


class LocalWorker:
    """Embedded mode: three background threads, one per stage, so that the sampler is never kept waiting.

    - The intake thread blocks on the queue (a submitted job wakes it at once), takes the jobs already
      queued, waits at most `batch_wait_s` for more only while `pending()` (requests being screened, not yet
      queued) is above zero (without `pending` it always waits), and claims the batch (one transaction).
    - The sampling thread samples the runs of each claimed batch.
    - The releasing thread releases (screens, signs, stores, audits) each sampled run while the sampling
      thread samples the next.

    While a batch is being sampled, the intake claims the next one ahead only once a full batch is queued:
    a partial batch claimed early would leave out the jobs that arrive during the run, which could have
    joined it. `on_finished` is called with each batch's job ids once they are released (it wakes
    long-polling requests).
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
        # Claimed batches with their sampling groups (None: stop); `_in_sampling` counts those handed over and
        # not yet sampled, at most two: the one being sampled and the one claimed ahead.
        self._claimed: queue.Queue[tuple[list[str], list[list[str]]] | None] = queue.Queue()
        self._turn = threading.Condition()
        self._in_sampling = 0
        # Sampled runs, then the batch they came from (None: stop). At most one waits while another is being
        # released: the sampler never gets further ahead than that.
        self._sampled: queue.Queue[SampledRun | list[str] | None] = queue.Queue(maxsize=1)
        self._threads = [threading.Thread(target=target, name=f"embedded-{name}", daemon=True)
                         for name, target in (("releaser", self._release_loop), ("sampler", self._sample_loop),
                                              ("intake", self._intake_loop))]
        for thread in self._threads:
            thread.start()

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)
        with self._turn:
            self._turn.notify_all()

    def ping(self) -> None:
        if not all(thread.is_alive() for thread in self._threads):
            raise RuntimeError("the embedded worker thread has stopped")

    def workers(self) -> list[dict[str, Any]]:
        return [{"host": "in-process", "pid": os.getpid(), "models": self._ctx.sampler.loaded(),
                 "alive": all(thread.is_alive() for thread in self._threads)}]

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
        with self._turn:
            self._turn.notify_all()
        for thread in reversed(self._threads):
            thread.join(timeout=30)

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

    def _may_gather(self) -> bool:
        """The sampler is free, or it is busy with one batch and a full batch (or the stop) is queued."""
        return self._in_sampling == 0 or (self._in_sampling == 1 and self._queue.qsize() >= self._batch_size)

    def _gather(self) -> tuple[list[str], bool]:
        """The next batch of queued job ids, and whether the stop came after them."""
        first = self._queue.get()
        if first is None:
            self._queue.task_done()
            return [], True
        batch = [first]
        deadline = time.monotonic() + self._batch_wait_s
        while len(batch) < self._batch_size:
            wait_s = self._companion_wait(deadline)
            try:
                item = self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
            except queue.Empty:
                if wait_s > 0:
                    continue  # still before the deadline: look at `pending` again
                break
            if item is None:
                self._queue.task_done()
                return batch, True
            batch.append(item)
        return batch, False

    def _intake_loop(self) -> None:
        while True:
            with self._turn:
                self._turn.wait_for(self._may_gather)
            batch, stop = self._gather()
            if batch:
                groups: list[list[str]] = []
                try:
                    groups = claim_jobs(self._ctx, batch)[1]
                except Exception:  # a database fault leaves the jobs queued; they are logged, not lost
                    log.exception("embedded worker could not claim jobs %s", batch)
                with self._turn:
                    self._in_sampling += 1
                self._claimed.put((batch, groups))
            if stop:
                self._claimed.put(None)
                return

    def _sample_loop(self) -> None:
        while (item := self._claimed.get()) is not None:
            batch, groups = item
            try:
                for ids in groups:
                    if (run := sample_run(self._ctx, ids)) is not None:
                        self._sampled.put(run)
            except Exception:  # a database fault here leaves the jobs leased; they are logged, not lost
                log.exception("embedded worker could not run jobs %s", batch)
            finally:
                self._sampled.put(batch)  # after its runs: the releaser reports the batch done
                with self._turn:
                    self._in_sampling -= 1
                    self._turn.notify_all()
        self._sampled.put(None)

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
