"""The job time limit, for real: `llamagen-gateway worker` with its default pool kills a job that runs past the
hard limit (with its process) and serves the next job from a new process, however long that process takes to
load its models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from generator.celery_app import make_celery
from tests.conftest import LEXICAL_POLICY, REPO, make_settings
from tests.services import unavailable
from tests.stuck_worker import STUCK_JOB

pytestmark = pytest.mark.slow
TIME_LIMIT_S = 5  # the smallest the settings allow; the soft limit is one second earlier


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    """A private redis-server on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        unavailable("redis-server", str(exc))
    try:
        _wait_for(lambda: _accepts(port), 10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _wait_for(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_a_job_past_the_hard_time_limit_is_killed_and_the_worker_serves_the_next(tmp_path, tiny_models,
                                                                                 broker_url) -> None:
    settings = make_settings(tmp_path / "var", broker_url=broker_url, job_time_limit_s=TIME_LIMIT_S)
    settings.data_dir.mkdir(parents=True)
    env = {**os.environ, "LLAMAGEN_GATEWAY_DATA_DIR": str(settings.data_dir),
           "LLAMAGEN_GATEWAY_BROKER_URL": broker_url, "LLAMAGEN_GATEWAY_MODELS_DIR": str(tiny_models),
           "LLAMAGEN_GATEWAY_DEFAULT_MODEL": "tiny-c2i", "LLAMAGEN_GATEWAY_POLICY_FILE": str(LEXICAL_POLICY),
           "LLAMAGEN_GATEWAY_ENV": "test", "LLAMAGEN_GATEWAY_SESSION_SECRET": "test-session-secret",
           "LLAMAGEN_GATEWAY_DEVICE": "cpu", "LLAMAGEN_GATEWAY_JOB_TIME_LIMIT_S": str(TIME_LIMIT_S),
           "LLAMAGEN_GATEWAY_LOG_JSON": "false", "OMP_NUM_THREADS": "1",
           # Longer than Celery's default 4 s for a new pool process to report: the worker must wait for it.
           "STUCK_WORKER_START_S": "5"}
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "tests.stuck_worker"], cwd=REPO, env=env,
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)
    stuck, following = tmp_path / "stuck", tmp_path / "following"
    try:
        app = make_celery(settings)
        app.send_task(STUCK_JOB, args=[str(stuck), 120])
        app.send_task(STUCK_JOB, args=[str(following), 0])
        assert _wait_for(stuck.with_suffix(".started").exists, 120), log.read_text()[-4000:]
        # Killed at the hard limit, a new process loads the model and takes the next job.
        assert _wait_for(following.with_suffix(".finished").exists, TIME_LIMIT_S + 40), log.read_text()[-4000:]
        assert not stuck.with_suffix(".finished").exists()
        assert following.with_suffix(".finished").read_text() != stuck.with_suffix(".started").read_text()
        assert worker.poll() is None
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
