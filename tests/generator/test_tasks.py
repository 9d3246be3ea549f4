"""The Celery task around the pipeline: what it retries, what a retry takes back, what a time limit ends."""

from __future__ import annotations

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

import generator.tasks as tasks
from audit.models import Job
from generator.pipeline import RunInterrupted
from tests.factories import submit_c2i


class Retried(Exception):
    """What the patched `retry` raises, carrying the arguments the task asked to be retried with."""

    def __init__(self, **kwargs) -> None:
        super().__init__(kwargs)
        self.kwargs = kwargs


@pytest.fixture
def task(c2i_state, monkeypatch):
    monkeypatch.setattr(tasks, "worker_context", lambda: c2i_state.ctx)
    monkeypatch.setattr(tasks.run_generation, "retry", lambda **kwargs: Retried(**kwargs))
    return tasks.run_generation


def interrupt(monkeypatch, job_ids: list[str], cause: Exception) -> None:
    def interrupted(ctx, job_id, wait_s, reclaim=()):
        raise RunInterrupted(job_ids, cause) from cause

    monkeypatch.setattr(tasks, "run_with_companions", interrupted)


def test_a_fault_after_the_claim_is_retried_with_the_leased_jobs_to_take_back(task, monkeypatch) -> None:
    interrupt(monkeypatch, ["a", "b"], OperationalError("SELECT", {}, Exception("connection lost")))
    with pytest.raises(Retried) as retried:
        task.run("a")
    assert retried.value.kwargs["kwargs"] == {"job_id": "a", "reclaim": ["a", "b"]}


def test_a_fault_before_the_claim_is_retried_as_it_was(task, monkeypatch) -> None:
    def down(ctx, job_id, wait_s, reclaim=()):
        raise OperationalError("BEGIN", {}, Exception("could not connect"))

    monkeypatch.setattr(tasks, "run_with_companions", down)
    with pytest.raises(Retried) as retried:
        task.run("a")
    assert "kwargs" not in retried.value.kwargs


def test_jobs_past_the_soft_time_limit_fail_saying_so_and_are_not_retried(task, c2i_state, monkeypatch) -> None:
    job_id = submit_c2i(c2i_state, class_id=1, seed=1)
    with c2i_state.ctx.sessions() as session, session.begin():
        session.get(Job, job_id).status = "running"
    interrupt(monkeypatch, [job_id], SoftTimeLimitExceeded())
    assert task.run(job_id) == []
    with c2i_state.ctx.sessions() as session:
        job = session.get(Job, job_id)
    assert job.status == "failed" and job.error == "the job's time limit was reached"


def test_a_retry_runs_the_jobs_its_interrupted_try_leased(task, c2i_state) -> None:
    job_id = submit_c2i(c2i_state, class_id=1, seed=2)
    with c2i_state.ctx.sessions() as session, session.begin():
        session.get(Job, job_id).status = "running"  # leased by the try that was interrupted
    assert task.run(job_id) == []  # a plain redelivery leaves it to its lease
    assert task.run(job_id, reclaim=[job_id]) == [job_id]
    with c2i_state.ctx.sessions() as session:
        assert session.get(Job, job_id).status == "completed"
