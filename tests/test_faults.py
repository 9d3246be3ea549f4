"""Load and faults, for real: 200 concurrent submissions to the distributed gateway (PostgreSQL, Redis, two
Celery workers as deployed: one prefork process each) while one worker process is killed with SIGKILL mid-run
and Redis is restarted. Afterwards every job is terminal, none is lost or duplicated, no unaudited image is left
in the store, and the audit chain verifies. Dependencies that are down give 503."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from audit.models import AuditEvent, Job, JobTransition
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
    """`llamagen-gateway worker` with its default pool (prefork, one process), as compose runs it."""
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker", "--hostname", f"{name}@%h"], cwd=REPO,
                            env=_env(settings), stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _pool_process(worker: subprocess.Popen[bytes], timeout: float = 120) -> int:
    """The pid of the process a prefork worker runs its jobs in: its one forked child, which keeps the worker's
    command line. Not just any child: while it starts, the worker also runs `ldconfig -p` (ctypes.util's
    find_library) and `uname -p` (platform.processor), which have the worker's command line only between their
    fork and exec, so a child counts once it has kept it over two looks."""
    command = Path(f"/proc/{worker.pid}/cmdline").read_bytes()
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        forked = set()
        for child in Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split():
            try:
                if Path(f"/proc/{child}/cmdline").read_bytes() == command:
                    forked.add(child)
            except OSError:  # a helper that exited meanwhile
                continue
        if kept := forked & seen:
            return int(kept.pop())
        seen = forked
        time.sleep(0.1)
    raise AssertionError("the worker started no pool process")


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
        workers = [_worker(settings, f"w{i}", tmp_path / f"worker{i}.log") for i in range(2)]
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

    def submit(i: int) -> tuple[int, dict]:
        r = gateway.client.post("/v1/generations", headers=gateway.auth(key),
                                json={"model": MODEL, "class_id": i % 8, "params": {"seed": i}})
        return r.status_code, r.json()

    victim = _pool_process(workers[0])
    with ThreadPoolExecutor(JOBS) as pool:  # all 200 submitted at once; the faults happen while they arrive
        submissions = pool.map(submit, range(JOBS))
        _wait_for_a_job_run_by(gateway, victim)
        os.kill(victim, signal.SIGKILL)  # mid-run: the process holds a leased job it will never finish
        redis.kill()  # the broker loses every queued message (it keeps nothing on disk)
        down = submit(JOBS)  # the broker is down: a clear 503, and the job is recorded as failed
        redis.start()
        restarted = datetime.now(UTC)
        results = list(submissions)

    assert down[0] == 503 and "job queue" in down[1]["error"]["message"], down
    assert "127.0.0.1" not in down[1]["error"]["message"], down  # the broker's address stays in the log
    accepted = [body["id"] for status, body in results if status == 202]
    refused = [body for status, body in results if status != 202]
    for body in refused:  # submitted while Redis was down: refused, saying why, and recorded
        assert body["error"]["code"] == "service_unavailable" and "job queue" in body["error"]["message"], body
    assert len(accepted) >= JOBS // 2, Counter(status for status, _ in results)

    deadline = time.monotonic() + 600
    with gateway.state.ctx.sessions() as session:
        while time.monotonic() < deadline:
            pending = session.scalars(select(Job.id).where(Job.status.not_in(TERMINAL))).all()
            if not pending:
                break
            session.expire_all()
            time.sleep(1)
        assert not pending, f"{len(pending)} jobs never finished; worker logs in {tmp_path}"
        jobs = {job.id: job for job in session.scalars(select(Job))}
        released = Counter(e.job_id for e in session.scalars(
            select(AuditEvent).where(AuditEvent.action == "image.released")))
        completed_events = Counter(e.job_id for e in session.scalars(
            select(AuditEvent).where(AuditEvent.action == "generation.completed")))
        picked_up_after_restart = session.scalar(select(func.count()).select_from(JobTransition).where(
            JobTransition.to_status == "running", JobTransition.at > restarted))

    assert len(jobs) == JOBS + 1  # every submission is recorded, refused ones too
    assert any(job.attempts > 1 for job in jobs.values()), "no job was taken over from the killed process"
    assert [job_id for job_id in accepted if jobs[job_id].status != "completed"] == [], \
        Counter(job.status for job in jobs.values())
    assert all(job.status == "failed" and job.error for job in jobs.values() if job.id not in accepted)
    for job in jobs.values():
        assert released[job.id] == len(job.images if job.status == "completed" else []), job.id
        assert completed_events[job.id] == (1 if job.status == "completed" else 0), job.id
        # Nothing signed is left in the store beyond what the audit log records (a killed attempt's leftovers
        # are removed by the attempt that finished the job).
        assert gateway.state.ctx.artifacts.keys(job.id) == sorted(image["uri"] for image in job.images), job.id
    assert picked_up_after_restart > 0 and all(worker.poll() is None for worker in workers), \
        "the workers did not carry on after the broker restarted"
    chain = gateway.client.get("/v1/audit/verify", headers=gateway.auth(gateway.key("auditor"))).json()
    assert chain["ok"], chain


def _wait_for_a_job_run_by(gateway, pid: int, timeout: float = 120) -> None:
    """Until a job is running in process `pid` (each lease records the worker process that took it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with gateway.state.ctx.sessions() as session:
            running = select(Job.id).where(Job.status == "running")
            if session.scalar(select(JobTransition.id).where(
                    JobTransition.job_id.in_(running), JobTransition.to_status == "running",
                    JobTransition.reason.endswith(f":{pid}")).limit(1)):
                return
        time.sleep(0.02)
    raise AssertionError(f"no job started running in process {pid}")


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


def test_postgresql_down_gives_503_saying_so_and_the_gateway_recovers_when_it_is_back(gateway_factory) -> None:
    from tests.services import _admin_connection

    with postgres_database() as url:
        name = url.rsplit("/", 1)[1]
        gateway = gateway_factory(database_url=url, policy_file=REPO / "tests" / "data" / "lexical-only.yaml")
        key = gateway.key("creator")
        request = {"model": MODEL, "class_id": 1}
        admin, _ = _admin_connection()
        try:  # the database goes away: no new connections, and every open one is cut
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            r = gateway.client.post("/v1/generations", headers=gateway.auth(key), json=request)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "service_unavailable"
            assert r.json()["error"]["message"].startswith("the database is unavailable")
            ready = gateway.client.get("/readyz")
            assert ready.status_code == 503 and not ready.json()["checks"]["database"]["ok"]
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.close()
        r = gateway.client.post("/v1/generations", headers=gateway.auth(key), json=request)
        assert r.status_code == 202, r.text
        assert gateway.wait(r.json()["id"], key)["status"] == "completed"
        with gateway.state.ctx.sessions() as session:  # the refused request left no job behind
            assert session.scalar(select(func.count()).select_from(Job)) == 1
