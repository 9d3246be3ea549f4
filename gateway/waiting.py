"""Long-polling: requests that wait for a job (`GET /v1/generations/{id}?wait=S`) are woken when it finishes.

The in-process worker calls `notify` after each run, so a waiting request reads the job once, when it has
changed, instead of clients polling it over HTTP (each poll is a request the sampler's cores must serve).
Celery workers live in other processes and notify nobody: waiters there re-read the job every `recheck_s`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class JobWaiters:
    """Asyncio events of the requests waiting for each job id, set from any thread by `notify`."""

    def __init__(self, recheck_s: float) -> None:
        self.recheck_s = recheck_s  # a waiter re-reads its job at least this often (no notification missed)
        self._lock = threading.Lock()
        self._waiting: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set when `job_id` may have changed; register before reading the job, so none is missed."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiting.setdefault(job_id, []).append(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                entries = self._waiting.get(job_id, [])
                if entry in entries:
                    entries.remove(entry)
                if not entries:
                    self._waiting.pop(job_id, None)

    def notify(self, job_ids: Iterable[str]) -> None:
        """Wake the requests waiting for these jobs (called by the worker thread after a run)."""
        with self._lock:
            woken = [entry for job_id in job_ids for entry in self._waiting.get(job_id, ())]
        for loop, event in woken:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that request's event loop has closed: nobody is waiting any more
                pass

    def waiting(self) -> int:
        """How many requests are waiting (metrics and tests)."""
        with self._lock:
            return sum(len(entries) for entries in self._waiting.values())
