"""Requests on their way to the job queue: what tells a worker whether waiting for companions can pay.

A request enters when it is accepted for prompt screening and leaves once its job is queued (or refused).
A worker that holds a job waits for compatible ones only while some request is in between; with none, no
job can arrive before the wait would end, so it samples at once (no idle wait at low load).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Intake:
    """A thread-safe count of the requests being screened or queued in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = 0

    def pending(self) -> int:
        return self._pending

    @contextmanager
    def admitting(self) -> Iterator[None]:
        """Count one request from screening until it leaves the block (queued, blocked or failed)."""
        with self._lock:
            self._pending += 1
        try:
            yield
        finally:
            with self._lock:
                self._pending -= 1
