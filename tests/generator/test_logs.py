"""Log lines: JSON with the request id, in the gateway and in Celery workers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from generator.logs import configure_logging, log_context
from tests.conftest import REPO

# What `celery worker` does to logging at start (prefork children inherit it), then a worker and a task log.
WORKER_LOGGING = """
import logging
from celery.utils.log import get_task_logger
from generator.celery_app import make_celery
from generator.logs import log_context

make_celery().log.setup(logging.INFO)
logging.getLogger("celery.apps.worker").info("ready")
with log_context(request_id="req-1", job_id="job-1"):
    get_task_logger("generator.tasks").info("job started")
"""

WARNING = """
import warnings
from generator.logs import configure_logging

configure_logging(json_logs=True)
warnings.warn("running as root")
"""


@pytest.fixture
def root_logger():  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_log_context_puts_the_request_id_on_each_json_line_inside_it(root_logger, capsys) -> None:
    configure_logging(json_logs=True)
    log = logging.getLogger("generator.pipeline")
    with log_context(request_id="req-1"):
        log.info("job %s started", "job-1")
    log.info("idle")

    inside, outside = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert inside["message"] == "job job-1 started" and inside["request_id"] == "req-1"
    assert "request_id" not in outside


def test_a_celery_worker_keeps_json_lines_with_the_request_id() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAGEN_GATEWAY_")}
    env |= {"LLAMAGEN_GATEWAY_LOG_JSON": "true", "LLAMAGEN_GATEWAY_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run([sys.executable, "-c", WORKER_LOGGING], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    ready, started = (json.loads(line) for line in result.stderr.splitlines())
    assert ready["logger"] == "celery.apps.worker" and ready["message"] == "ready"
    assert started["message"] == "job started" and started["request_id"] == "req-1"
    assert started["job_id"] == "job-1"


def test_warnings_are_json_lines_too() -> None:
    result = subprocess.run([sys.executable, "-c", WARNING], cwd=REPO, capture_output=True, text=True, timeout=60)
    [line] = result.stderr.splitlines()
    entry = json.loads(line)
    assert entry["logger"] == "py.warnings" and "running as root" in entry["message"]
