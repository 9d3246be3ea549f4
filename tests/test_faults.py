"""Load and faults, for real: 200 concurrent submissions to the distributed gateway (PostgreSQL, Redis, two
Celery worker processes) while one worker is killed with SIGKILL and Redis is restarted. Afterwards every job
is terminal, none is lost or duplicated, and the audit chain verifies. Dependencies that are down give 503."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import select

from audit.models import AuditEvent, Job
from tests.conftest import DEMO_MODELS, REPO, Gateway, make_settings
from tests.services import postgres_database, unavailable

pytestmark = [pytest.mark.services, pytest.mark.slow]
JOBS = 200
MODEL = "demo-shapes-c2i"
TERMINAL = {"completed", "blocked", "failed"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on its own port, so the test can kill and restart it."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _env(settings) -> dict[str, str]:
    return {**os.environ, "LLAMAGEN_GATEWAY_DATA_DIR": str(settings.data_dir),
            "LLAMAGEN_GATEWAY_DATABASE_URL": settings.database_url,
            "LLAMAGEN_GATEWAY_BROKER_URL": settings.broker_url, "LLAMAGEN_GATEWAY_MODELS_DIR": str(settings.models_dir),
            "LLAMAGEN_GATEWAY_POLICY_FILE": str(settings.policy_file), "LLAMAGEN_GATEWAY_ENV": "test",
            "LLAMAGEN_GATEWAY_SESSION_SECRET": "test-session-secret", "LLAMAGEN_GATEWAY_DEVICE": "cpu",
            "LLAMAGEN_GATEWAY_JOB_TIME_LIMIT_S": str(settings.job_time_limit_s),
            "LLAMAGEN_GATEWAY_BROKER_VISIBILITY_TIMEOUT_S": str(settings.broker_visibility_timeout_s),
            "LLAMAGEN_GATEWAY_LOG_JSON": "false", "OMP_NUM_THREADS": "1"}


def _worker(settings, name: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker", "--pool", "solo", "--hostname",
                             f"{name}@%h"], cwd=REPO, env=_env(settings), stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


@pytest.fixture
def cluster(tmp_path: Path):
    from fastapi.testclient import TestClient

    from audit.db import upgrade_database
    from gateway.main import create_app
    from gateway.state import build_state, close_state

    if not (DEMO_MODELS / f"{MODEL}.yaml").is_file():
        unavailable("demo model", f"{MODEL} is not installed under {DEMO_MODELS}")
    redis = RedisServer(tmp_path)
    try:
        redis.start()
    except (OSError, RuntimeError) as exc:
        unavailable("redis-server", str(exc))
    with postgres_database() as db_url:
        settings = make_settings(tmp_path / "var", database_url=db_url, broker_url=redis.url,
                                 policy_file=REPO / "tests" / "data" / "lexical-only.yaml",
                                 job_time_limit_s=20, broker_visibility_timeout_s=15, requeue_after_s=5,
                                 rate_limit_per_minute=0, team_quota_per_day=0)
        settings.data_dir.mkdir(parents=True)
        upgrade_database(db_url)
        state = build_state(settings)
        workers = [_worker(settings, "w0", tmp_path / "worker0.log")]
        client = TestClient(create_app(settings, state=state), raise_server_exceptions=False)
        client.__enter__()
        try:
            yield Gateway(client, state), workers, redis, settings, tmp_path
        finally:
            client.__exit__(None, None, None)
            close_state(state)
            for w in workers:
                w.kill()
                w.wait()
            redis.kill()


def test_no_job_is_lost_or_duplicated_when_a_worker_dies_and_redis_restarts(cluster) -> None:
    gateway, workers, redis, settings, tmp_path = cluster
    key = gateway.key("creator", team="load")

    def submit(i: int) -> tuple[int, str | None]:
        r = gateway.client.post("/v1/generations", headers=gateway.auth(key),
                                json={"model": MODEL, "class_id": i % 8, "params": {"seed": i}})
        body = r.json()
        return r.status_code, body.get("id") or body.get("error", {}).get("details", {}).get("id")

    with ThreadPoolExecutor(16) as pool:
        first = list(pool.map(submit, range(JOBS // 2)))
        _wait_for_a_running_job(gateway)
        workers[0].send_signal(signal.SIGKILL)  # mid-run: it holds a leased job it will never finish
        workers[0].wait()
        redis.kill()  # the broker loses every queued message (it keeps nothing on disk)
        down = submit(JOBS)  # the broker is down: a clear 503, and the job is recorded as failed
        redis.start()
        workers += [_worker(settings, f"w{i}", tmp_path / f"worker{i}.log") for i in (1, 2)]
        second = list(pool.map(submit, range(JOBS // 2, JOBS)))

    assert down[0] == 503
    accepted = [job_id for status, job_id in first + second if status == 202]
    assert len(accepted) >= JOBS - 16, Counter(status for status, _ in first + second)

    deadline = time.monotonic() + 600
    with gateway.state.ctx.sessions() as session:
        while time.monotonic() < deadline:
            pending = session.scalars(select(Job.id).where(Job.status.not_in(TERMINAL))).all()
            if not pending:
                break
            session.expire_all()
            time.sleep(1)
        assert not pending, f"{len(pending)} jobs never finished; worker logs in {tmp_path}"
        jobs = session.scalars(select(Job)).all()
        released = Counter(e.job_id for e in session.scalars(
            select(AuditEvent).where(AuditEvent.action == "image.released")))
        completed_events = Counter(e.job_id for e in session.scalars(
            select(AuditEvent).where(AuditEvent.action == "generation.completed")))

    by_status = Counter(j.status for j in jobs)
    assert any(j.attempts > 1 for j in jobs), "no job was taken over from the killed worker"
    assert by_status["completed"] >= len(accepted) * 0.95, by_status
    for job in jobs:
        expected = len(job.images) if job.status == "completed" else 0
        assert released[job.id] == expected, (job.id, job.status, released[job.id])
        assert completed_events[job.id] == (1 if job.status == "completed" else 0), job.id
        if job.status == "failed":
            assert job.error
    for job in jobs:
        for image in job.images:
            assert gateway.state.ctx.artifacts.exists(image["uri"])
    chain = gateway.client.get("/v1/audit/verify", headers=gateway.auth(gateway.key("auditor"))).json()
    assert chain["ok"], chain


def _wait_for_a_running_job(gateway, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with gateway.state.ctx.sessions() as session:
            if session.scalar(select(Job.id).where(Job.status == "running").limit(1)):
                return
        time.sleep(0.02)
    raise AssertionError("no job started running")


def test_database_down_gives_503_and_nothing_is_generated(gateway_factory, tmp_path) -> None:
    gateway = gateway_factory(policy_file=REPO / "tests" / "data" / "lexical-only.yaml")
    key = gateway.key("creator")
    engine = gateway.state.ctx.sessions.kw["bind"]
    Path(engine.url.database).rename(Path(engine.url.database + ".moved"))
    engine.dispose()
    try:
        r = gateway.client.post("/v1/generations", headers=gateway.auth(key),
                                json={"model": MODEL, "class_id": 1})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "service_unavailable"
        assert gateway.client.get("/readyz").status_code == 503
    finally:
        Path(engine.url.database + ".moved").rename(Path(engine.url.database))
        engine.dispose()
