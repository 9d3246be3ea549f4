"""`llamagen-gateway worker` serving one more task: a stuck job, for tests/test_worker_time_limit.py.

Run as `python -m tests.stuck_worker [worker options]`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init

from gateway import cli
from generator.celery_app import app

STUCK_JOB = "tests.stuck_job"


@app.task(name=STUCK_JOB)
def stuck_job(marker: str, seconds: float) -> None:
    """Write `marker`.started, sleep through the soft time limit (as a hung GPU call would), write `marker`.finished."""
    path = Path(marker)
    path.with_suffix(".started").write_text(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except SoftTimeLimitExceeded:
            pass
    path.with_suffix(".finished").write_text(str(os.getpid()))


@worker_process_init.connect
def _slow_start(**_: object) -> None:
    """Each pool process takes STUCK_WORKER_START_S seconds to get ready, as loading a real checkpoint does."""
    time.sleep(float(os.environ.get("STUCK_WORKER_START_S", "0")))


if __name__ == "__main__":
    sys.exit(cli.main(["worker", *sys.argv[1:]]))
