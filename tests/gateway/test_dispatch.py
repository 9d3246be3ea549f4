"""The embedded worker: nothing is released unsigned or unaudited when the release fails, closing it
finishes what was submitted, it samples the next run while the one before is released, and it claims the
next full batch while one is being sampled."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from sqlalchemy import select

from audit.models import AuditEvent, Job
from gateway import dispatch
from gateway.dispatch import LocalWorker
from generator import pipeline
from generator.intake import Intake
from tests.factories import submit_c2i


def statuses(state, ids: Sequence[str]) -> list[str]:
    with state.ctx.sessions() as session:
        return [session.get(Job, job_id).status for job_id in ids]


def events(state, action: str) -> list[AuditEvent]:
    with state.ctx.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def test_a_fault_in_the_release_fails_the_runs_jobs_with_the_reason(c2i_state, monkeypatch) -> None:
    ids = [submit_c2i(c2i_state, class_id=i, seed=i) for i in range(2)]

    def broken(*args, **kwargs):
        raise RuntimeError("artifact store exploded")

    monkeypatch.setattr(pipeline, "_release", broken)
    worker = LocalWorker(c2i_state.ctx, batch_size=2, batch_wait_s=0.5)
    try:
        for job_id in ids:
            worker.submit(job_id)
        assert worker.drain(timeout=30)
    finally:
        worker.close()
    with c2i_state.ctx.sessions() as session:
        jobs = [session.get(Job, job_id) for job_id in ids]
    assert all(job.status == "failed" and "artifact store exploded" in job.error and not job.images for job in jobs)
    assert sorted(e.job_id for e in events(c2i_state, "generation.failed")) == sorted(ids)
    assert not events(c2i_state, "image.released")


def test_closing_the_worker_releases_what_it_sampled_first(c2i_state) -> None:
    ids = [submit_c2i(c2i_state, class_id=i, seed=i) for i in range(3)]
    worker = LocalWorker(c2i_state.ctx, batch_size=1, batch_wait_s=0.0)
    for job_id in ids:
        worker.submit(job_id)
    worker.close()
    assert statuses(c2i_state, ids) == ["completed"] * 3
    with pytest.raises(RuntimeError, match="stopped"):
        worker.ping()


def test_the_worker_samples_at_once_when_no_request_is_on_its_way(c2i_state) -> None:
    job_id = submit_c2i(c2i_state, class_id=0, seed=0)
    worker = LocalWorker(c2i_state.ctx, batch_size=4, batch_wait_s=60.0, pending=lambda: 0)
    try:
        worker.submit(job_id)
        assert worker.drain(timeout=30)  # not held for the 60 s batch wait
    finally:
        worker.close()
    assert statuses(c2i_state, [job_id]) == ["completed"]


def test_the_worker_waits_for_a_request_still_being_screened_and_batches_it(c2i_state) -> None:
    ids = [submit_c2i(c2i_state, class_id=i, seed=i) for i in range(2)]
    intake = Intake()
    batches: list[list[str]] = []
    worker = LocalWorker(c2i_state.ctx, batch_size=4, batch_wait_s=30.0, pending=intake.pending,
                         on_finished=lambda batch: batches.append(list(batch)))
    try:
        with intake.admitting():  # the second request, still in screening when the first is queued
            worker.submit(ids[0])
            time.sleep(0.3)
            worker.submit(ids[1])
        assert worker.drain(timeout=30)
    finally:
        worker.close()
    assert batches == [ids]


def test_the_worker_samples_the_next_run_while_the_one_before_is_released(c2i_state, monkeypatch) -> None:
    ids = [submit_c2i(c2i_state, class_id=i, seed=i) for i in range(2)]
    sampled: list[list[str]] = []
    first_release_may_end = threading.Event()
    sample_run, release_run = dispatch.sample_run, dispatch.release_run

    def recording_sample_run(ctx, job_ids):
        run = sample_run(ctx, job_ids)
        sampled.append(list(job_ids))
        return run

    def held_release_run(ctx, run):
        if run.job_ids == ids[:1]:
            assert first_release_may_end.wait(timeout=30)
        release_run(ctx, run)

    monkeypatch.setattr(dispatch, "sample_run", recording_sample_run)
    monkeypatch.setattr(dispatch, "release_run", held_release_run)
    worker = LocalWorker(c2i_state.ctx, batch_size=1, batch_wait_s=0.0)
    try:
        for job_id in ids:
            worker.submit(job_id)
        deadline = time.monotonic() + 30
        while len(sampled) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sampled == [ids[:1], ids[1:]]  # the second run was sampled while the first was being released
        assert statuses(c2i_state, ids) == ["running", "running"]
        first_release_may_end.set()
        assert worker.drain(timeout=30)
    finally:
        first_release_may_end.set()
        worker.close()
    assert statuses(c2i_state, ids) == ["completed", "completed"]


def wait_for_statuses(state, ids: Sequence[str], expected: list[str]) -> list[str]:
    deadline = time.monotonic() + 30
    while (seen := statuses(state, ids)) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return seen


def test_the_worker_claims_the_next_full_batch_while_it_samples_but_not_a_partial_one(c2i_state, monkeypatch) -> None:
    a, b, c, d = (submit_c2i(c2i_state, class_id=i, seed=i) for i in range(4))
    first_run_may_end = threading.Event()
    batches: list[list[str]] = []
    sample_run = dispatch.sample_run

    def held_sample_run(ctx, job_ids):
        if list(job_ids) == [a]:
            assert first_run_may_end.wait(timeout=30)
        return sample_run(ctx, job_ids)

    monkeypatch.setattr(dispatch, "sample_run", held_sample_run)
    worker = LocalWorker(c2i_state.ctx, batch_size=2, batch_wait_s=0.0, pending=lambda: 0,
                         on_finished=lambda batch: batches.append(list(batch)))
    try:
        worker.submit(a)
        assert wait_for_statuses(c2i_state, [a], ["running"]) == ["running"]
        worker.submit(b)  # half a batch: it waits for the run of `a` to end, and for companions meanwhile
        time.sleep(0.3)
        assert statuses(c2i_state, [b]) == ["queued"]
        worker.submit(c)  # now a full batch is queued: it is claimed while `a` is still being sampled
        assert wait_for_statuses(c2i_state, [b, c], ["running", "running"]) == ["running", "running"]
        worker.submit(d)  # one batch being sampled and one claimed ahead: nothing more is taken
        time.sleep(0.3)
        assert statuses(c2i_state, [a, d]) == ["running", "queued"]
        first_run_may_end.set()
        assert worker.drain(timeout=30)
    finally:
        first_run_may_end.set()
        worker.close()
    assert batches == [[a], [b, c], [d]]
    assert statuses(c2i_state, [a, b, c, d]) == ["completed"] * 4


def test_the_celery_dispatcher_is_configured_by_the_settings_it_is_given_not_the_environment(
    tmp_path, monkeypatch
) -> None:
    from gateway.dispatch import CeleryDispatcher
    from tests.conftest import make_settings

    monkeypatch.setenv("LLAMAGEN_GATEWAY_JOB_TIME_LIMIT_S", "42")
    monkeypatch.setenv("LLAMAGEN_GATEWAY_ENV", "prod")  # invalid alone (no secrets): must not be read at all
    settings = make_settings(tmp_path, broker_url="memory://", job_time_limit_s=900)
    dispatcher = CeleryDispatcher(settings)
    try:
        assert dispatcher._app.conf.task_time_limit == 900
        assert dispatcher._app.conf.broker_transport_options == {"visibility_timeout": 1800}
    finally:
        dispatcher.close()
