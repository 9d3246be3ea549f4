"""The worker pipeline: batching, idempotent redelivery, leases, and bit-for-bit reproduction."""

from __future__ import annotations

import gc
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from audit.models import AuditEvent, Job, JobTransition, ModelCardRecord
from generator.pipeline import RunInterrupted, freeze_heap, reproduce_event, run_jobs, run_with_companions
from tests.factories import submit_c2i


def count_calls(state, monkeypatch) -> list[int]:
    model = state.ctx.registry.load("tiny-c2i", "cpu")
    calls: list[int] = []
    original = model.generate

    def spy(requests, params=None):
        calls.append(len(requests))
        return original(requests, params)

    monkeypatch.setattr(model, "generate", spy)
    return calls


def events(state, action: str) -> list[AuditEvent]:
    with state.ctx.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def test_compatible_jobs_share_one_sampling_run(c2i_state, monkeypatch) -> None:
    calls = count_calls(c2i_state, monkeypatch)
    ids = [submit_c2i(c2i_state, class_id=i, seed=i) for i in range(3)] + [submit_c2i(c2i_state, 1, 9, cfg_scale=3.0)]
    run_jobs(c2i_state.ctx, ids)
    assert sorted(calls) == [1, 3]  # the job with another cfg_scale runs apart


def test_a_redelivered_job_releases_nothing_twice(c2i_state) -> None:
    job_id = submit_c2i(c2i_state, class_id=2, seed=5, num_images=2)
    assert run_jobs(c2i_state.ctx, [job_id]) == [job_id]
    assert run_jobs(c2i_state.ctx, [job_id]) == []
    released = Counter(e.job_id for e in events(c2i_state, "image.released"))
    assert released[job_id] == 2
    assert len([e for e in events(c2i_state, "generation.completed") if e.job_id == job_id]) == 1


def test_a_job_leased_by_a_live_worker_is_left_alone_and_taken_over_when_the_lease_expires(c2i_state) -> None:
    job_id = submit_c2i(c2i_state, class_id=3, seed=1)
    with c2i_state.ctx.sessions() as session, session.begin():
        job = session.get(Job, job_id)
        job.status, job.updated_at = "running", datetime.now(UTC)
    assert run_jobs(c2i_state.ctx, [job_id]) == []
    with c2i_state.ctx.sessions() as session, session.begin():
        session.get(Job, job_id).updated_at = datetime.now(UTC) - timedelta(seconds=c2i_state.ctx.lease_s + 1)
    assert run_jobs(c2i_state.ctx, [job_id]) == [job_id]
    with c2i_state.ctx.sessions() as session:
        assert session.get(Job, job_id).status == "completed"


def test_a_queue_worker_batches_queued_companions(c2i_state, monkeypatch) -> None:
    calls = count_calls(c2i_state, monkeypatch)
    first, *others = [submit_c2i(c2i_state, class_id=i, seed=i) for i in range(4)]
    ran = run_with_companions(c2i_state.ctx, first, wait_s=0.0)
    assert sorted(ran) == sorted([first, *others]) and calls == [4]
    assert all(run_jobs(c2i_state.ctx, [other]) == [] for other in others)  # their own messages are no-ops


def test_a_released_image_is_reproduced_bit_for_bit(c2i_state) -> None:
    job_id = submit_c2i(c2i_state, class_id=4, seed=123)
    run_jobs(c2i_state.ctx, [job_id])
    event = next(e for e in events(c2i_state, "image.released") if e.job_id == job_id)
    with c2i_state.ctx.sessions() as session:
        report = reproduce_event(session, event.id, c2i_state.settings)
    assert report["match"], report


def test_reproduction_samples_with_the_decode_layout_the_image_was_released_with(c2i_state, monkeypatch) -> None:
    from generator.llamagen.layout import DecodeLayout, apply_layout

    model = c2i_state.ctx.registry.load("tiny-c2i", "cpu")
    apply_layout(model.gpt, DecodeLayout("streaming"))  # what the worker's timing chose
    job_id = submit_c2i(c2i_state, class_id=2, seed=7)
    run_jobs(c2i_state.ctx, [job_id])
    event = next(e for e in events(c2i_state, "image.released") if e.job_id == job_id)
    assert event.payload["decode_layout"] == "streaming"
    apply_layout(model.gpt, DecodeLayout("plain"))  # what this process's timing chose
    layouts: list[str] = []
    original = model.generate

    def spy(requests, params=None):
        layouts.append(model.gpt.decode_layout)
        return original(requests, params)

    monkeypatch.setattr(model, "generate", spy)
    with c2i_state.ctx.sessions() as session:
        report = reproduce_event(session, event.id, c2i_state.settings)
    assert report["match"] and report["decode_layout"] == "streaming" and layouts == ["streaming"]
    assert model.gpt.decode_layout == "plain"  # this process's own layout is back


def test_a_model_fault_fails_the_job_with_its_reason_and_audits_it(c2i_state, monkeypatch) -> None:
    model = c2i_state.ctx.registry.load("tiny-c2i", "cpu")

    def broken(requests, params=None):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(model, "generate", broken)
    job_id = submit_c2i(c2i_state, class_id=1, seed=1)
    run_jobs(c2i_state.ctx, [job_id])
    with c2i_state.ctx.sessions() as session:
        job = session.get(Job, job_id)
    assert job.status == "failed" and "out of memory" in job.error
    assert any(e.job_id == job_id for e in events(c2i_state, "generation.failed"))


def test_a_sampling_run_screens_its_images_in_one_batch_and_audits_its_jobs_in_one_commit(
    c2i_state, monkeypatch
) -> None:
    runtime = c2i_state.ctx.policies.runtime()
    batches: list[int] = []
    original = runtime.screen_image_sets

    def spy(sets):
        batches.append(sum(len(images) for images, _ in sets))
        return original(sets)

    monkeypatch.setattr(runtime, "screen_image_sets", spy)
    ids = [submit_c2i(c2i_state, class_id=i, seed=i, num_images=2) for i in range(3)]
    commits = c2i_state.ctx.commits.commits
    assert sorted(run_jobs(c2i_state.ctx, ids)) == sorted(ids)
    assert batches == [6] and c2i_state.ctx.commits.commits == commits + 1
    with c2i_state.ctx.sessions() as session:
        jobs = [session.get(Job, job_id) for job_id in ids]
    assert all(job.status == "completed" and len(job.images) == 2 for job in jobs)
    for job in jobs:  # every job records the whole run's stage times, its request's audit time included
        t = job.timings
        assert t["audit_s"] == pytest.approx(t["request_audit_s"] + t["release_audit_s"], abs=2e-4)
        assert {"prompt_screening_s", "queue_s", "sampling_s", "decode_s", "output_screening_s", "signing_s"} <= set(t)
        assert t["sampling_s"] > 0 and t["decode_s"] > 0
    assert len({job.timings["signing_s"] for job in jobs}) == 1


def test_a_job_whose_signing_fails_fails_alone_and_its_companions_are_released(c2i_state, monkeypatch) -> None:
    ids = [submit_c2i(c2i_state, class_id=i, seed=i) for i in range(3)]
    original = c2i_state.ctx.signer.sign_png

    def sign(data, *, title, **kwargs):
        if title.startswith(ids[1]):
            raise RuntimeError("HSM unreachable")
        return original(data, title=title, **kwargs)

    monkeypatch.setattr(c2i_state.ctx.signer, "sign_png", sign)
    run_jobs(c2i_state.ctx, ids)
    with c2i_state.ctx.sessions() as session:
        statuses = [session.get(Job, job_id).status for job_id in ids]
        error = session.get(Job, ids[1]).error
    assert statuses == ["completed", "failed", "completed"] and "HSM unreachable" in error
    assert [e.job_id for e in events(c2i_state, "generation.failed")] == [ids[1]]
    assert ids[1] not in {e.job_id for e in events(c2i_state, "image.released")}


def test_the_served_model_card_is_recorded_once_and_every_release_names_it(c2i_state) -> None:
    ids = [submit_c2i(c2i_state, class_id=i, seed=i) for i in range(3)]
    run_jobs(c2i_state.ctx, ids)
    card = c2i_state.ctx.registry.get("tiny-c2i")
    with c2i_state.ctx.sessions() as session:
        records = session.scalars(select(ModelCardRecord)).all()
    assert [r.content_hash for r in records] == [card.content_hash]
    released = events(c2i_state, "image.released")
    assert len(released) == 3 and all(e.payload["model_card_hash"] == card.content_hash
                                       and e.payload["checkpoints"] == card.checkpoint_digests() for e in released)


def test_freeze_heap_spares_loaded_objects_from_collections_and_still_collects_new_garbage() -> None:
    try:
        assert freeze_heap() > 0  # (a served gateway's warm-up thread in this process may freeze too)
        cycle: list[object] = []
        cycle.append(cycle)  # garbage made after the freeze, reachable only through a reference cycle
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()


def test_a_release_whose_audit_commit_fails_leaves_no_signed_image_in_the_store(c2i_state, monkeypatch) -> None:
    from pathlib import Path

    from sqlalchemy.exc import OperationalError

    from generator.pipeline import release_run, sample_jobs

    ctx = c2i_state.ctx
    commit = ctx.commits.run

    def failing_release_commit(work):
        if work.__qualname__.startswith("_record."):  # the release's audit unit; the request's went through
            raise OperationalError("COMMIT", {}, Exception("disk I/O error"))
        return commit(work)

    monkeypatch.setattr(ctx.commits, "run", failing_release_commit)
    job_id = submit_c2i(c2i_state, class_id=1, seed=7)
    for run in sample_jobs(ctx, [job_id])[1]:
        release_run(ctx, run)
    with ctx.sessions() as session:
        assert session.get(Job, job_id).status == "failed"
    assert list((Path(ctx.artifacts.root) / job_id).glob("*.png")) == []


def test_a_late_duplicate_release_neither_overwrites_nor_adds_to_the_audited_image(c2i_state) -> None:
    import hashlib
    from pathlib import Path

    from generator.pipeline import release_run, sample_jobs

    ctx = c2i_state.ctx
    job_id = submit_c2i(c2i_state, class_id=2, seed=11)
    (late,) = sample_jobs(ctx, [job_id])[1]  # worker A sampled, then stalled past its lease
    with ctx.sessions() as session, session.begin():
        session.get(Job, job_id).updated_at = datetime.now(UTC) - timedelta(seconds=ctx.lease_s + 1)
    for run in sample_jobs(ctx, [job_id])[1]:  # worker B takes the job over and releases it
        release_run(ctx, run)
    release_run(ctx, late)  # A catches up: its record is a no-op, and what it stored is withdrawn
    with ctx.sessions() as session:
        (image,) = session.get(Job, job_id).images
    (stored,) = (Path(ctx.artifacts.root) / job_id).glob("*.png")
    assert image["uri"] == f"{job_id}/{stored.name}"
    assert hashlib.sha256(ctx.artifacts.get(image["uri"])).hexdigest() == image["sha256"]


def test_two_workers_claiming_one_job_at_once_lease_it_once(c2i_state, monkeypatch) -> None:
    import threading
    import time

    import generator.pipeline as pipeline

    job_id = submit_c2i(c2i_state, class_id=1, seed=1)
    transition = pipeline.transition
    # The first claimer holds its transaction open a while, so the second claims while it is in progress.
    monkeypatch.setattr(pipeline, "transition", lambda *args: (time.sleep(0.3), transition(*args))[1])
    claims: list[list[str]] = []
    workers = [threading.Thread(target=lambda: claims.append(pipeline.claim_jobs(c2i_state.ctx, [job_id])[0]))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(claims) == [[], [job_id]]


def expire_lease(state, job_id: str, attempts: int | None = None) -> None:
    """Make `job_id` look like the job of a worker that died: running, its lease expired."""
    with state.ctx.sessions() as session, session.begin():
        job = session.get(Job, job_id)
        job.status, job.updated_at = "running", datetime.now(UTC) - timedelta(seconds=state.ctx.lease_s + 1)
        if attempts is not None:
            job.attempts = attempts


def test_a_job_that_used_up_its_attempts_fails_saying_so_instead_of_running_again(c2i_state, monkeypatch) -> None:
    calls = count_calls(c2i_state, monkeypatch)
    job_id = submit_c2i(c2i_state, class_id=1, seed=3)
    expire_lease(c2i_state, job_id, attempts=c2i_state.ctx.max_attempts)  # each worker died with it
    assert run_jobs(c2i_state.ctx, [job_id]) == [] and calls == []
    with c2i_state.ctx.sessions() as session:
        job = session.get(Job, job_id)
    assert job.status == "failed"
    assert job.error.startswith(f"gave up after {c2i_state.ctx.max_attempts} attempts: none ended with a result")
    assert [e.payload["error"] for e in events(c2i_state, "generation.failed")] == [job.error]


def test_a_retry_takes_back_at_once_the_jobs_its_interrupted_try_leased(c2i_state, monkeypatch) -> None:
    from sqlalchemy.exc import OperationalError

    import generator.pipeline as pipeline

    ids = [submit_c2i(c2i_state, class_id=i, seed=i) for i in range(2)]
    sample_run = pipeline.sample_run

    def database_lost(ctx, job_ids):
        raise OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(pipeline, "sample_run", database_lost)
    with pytest.raises(RunInterrupted) as interrupted:
        run_with_companions(c2i_state.ctx, ids[0], wait_s=0.0)
    assert sorted(interrupted.value.job_ids) == sorted(ids)
    monkeypatch.setattr(pipeline, "sample_run", sample_run)
    assert run_jobs(c2i_state.ctx, ids) == []  # leased: another delivery leaves them to their worker
    ran = run_with_companions(c2i_state.ctx, ids[0], wait_s=0.0, reclaim=interrupted.value.job_ids)
    assert sorted(ran) == sorted(ids)
    with c2i_state.ctx.sessions() as session:
        assert [session.get(Job, j).status for j in ids] == ["completed", "completed"]
        reasons = [t.reason for t in session.scalars(select(JobTransition).where(JobTransition.job_id == ids[0]))]
    assert any(reason.startswith("taken back after a fault by worker ") for reason in reasons)


def test_a_taken_over_job_removes_the_unaudited_image_its_killed_worker_stored(c2i_state) -> None:
    ctx = c2i_state.ctx
    job_id = submit_c2i(c2i_state, class_id=1, seed=6)
    run_jobs(ctx, [job_id])  # a first worker stores a signed image, then is killed before its audit commit:
    with ctx.sessions() as session:
        (first,) = session.get(Job, job_id).images
    orphan = f"{job_id}/0-killed-attempt.png"
    ctx.artifacts.put(orphan, ctx.artifacts.get(first["uri"]))
    ctx.artifacts.delete(first["uri"])
    with ctx.sessions() as session, session.begin():
        job = session.get(Job, job_id)
        job.images, job.decisions = [], {k: v for k, v in job.decisions.items() if k != "output"}
    expire_lease(c2i_state, job_id)
    assert run_jobs(ctx, [job_id]) == [job_id]  # taken over and released by another worker
    with ctx.sessions() as session:
        (image,) = session.get(Job, job_id).images
    assert ctx.artifacts.keys(job_id) == [image["uri"]]


def test_a_job_failed_after_a_takeover_leaves_nothing_an_earlier_attempt_stored(c2i_state, monkeypatch) -> None:
    ctx = c2i_state.ctx
    job_id = submit_c2i(c2i_state, class_id=1, seed=8)
    ctx.artifacts.put(f"{job_id}/0-killed-attempt.png", b"\x89PNG signed, never audited")
    expire_lease(c2i_state, job_id, attempts=1)
    monkeypatch.setattr(ctx.sampler, "generate", lambda *args: (_ for _ in ()).throw(RuntimeError("CUDA OOM")))
    run_jobs(ctx, [job_id])
    with ctx.sessions() as session:
        assert session.get(Job, job_id).status == "failed"
    assert ctx.artifacts.keys(job_id) == []


@pytest.fixture
def pg_c2i_state(tmp_path, tiny_models):
    """Gateway state on the tiny c2i model with its jobs in a fresh PostgreSQL database (row locks)."""
    from audit.db import upgrade_database
    from gateway.state import build_state, close_state
    from tests.conftest import LEXICAL_POLICY, make_settings
    from tests.factories import RecordingDispatcher
    from tests.services import postgres_database

    with postgres_database("test_pipeline") as url:
        upgrade_database(url)
        settings = make_settings(tmp_path / "var", database_url=url, models_dir=tiny_models,
                                 default_model="tiny-c2i", policy_file=LEXICAL_POLICY, rate_limit_per_minute=0)
        state = build_state(settings, dispatcher=RecordingDispatcher())
        yield state
        close_state(state)


def test_two_workers_claiming_the_same_jobs_in_opposite_orders_do_not_deadlock(pg_c2i_state, monkeypatch) -> None:
    import threading
    import time

    import generator.pipeline as pipeline

    a, b = (submit_c2i(pg_c2i_state, class_id=i, seed=i) for i in range(2))
    transition = pipeline.transition
    # Each claimer pauses at every job it leases, so the two claims overlap: each task's own job first, then
    # its companion, in opposite orders.
    monkeypatch.setattr(pipeline, "transition", lambda *args: (time.sleep(0.3), transition(*args))[1])
    claims: list[list[str]] = []
    errors: list[BaseException] = []

    def claim(ids: list[str]) -> None:
        try:
            claims.append(pipeline.claim_jobs(pg_c2i_state.ctx, ids)[0])
        except BaseException as exc:  # a deadlock is reported here
            errors.append(exc)

    workers = [threading.Thread(target=claim, args=(ids,)) for ids in ([a, b], [b, a])]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert sorted(map(sorted, claims)) == [[], sorted([a, b])]  # one leased both; the other found them leased


def review_second_image(state, monkeypatch) -> None:
    """Output screening allows each job's first image and sends the others to human review."""
    from policies.classifiers.base import ClassifierResult
    from policies.decisions import Decision, Reason
    from policies.runtime import Screening

    runtime = state.ctx.policies.runtime()

    def screening(action: str) -> Screening:
        reasons = (Reason("look_closer", "image_concepts", "logo", 0.4, 0.3, "review", "a human decides"),)
        return Screening(Decision(action, reasons if action == "review" else (), runtime.revision, stage="output"),
                         (ClassifierResult("image_concepts", "v1", {"logo": 0.4}, 1.0),))

    monkeypatch.setattr(runtime, "screen_image_sets", lambda sets: [
        [screening("allow" if i == 0 else "review") for i in range(len(images))] for images, _ in sets])


def policy_assertion(png: bytes) -> dict:
    from audit.provenance import verify_image

    manifest = verify_image(png).manifest or {}
    carried = {a["label"]: a["data"] for a in manifest["assertions"]}
    return dict(carried["com.llamagen-gateway.policy-decision"])


def decide(state, job_id: str, decision: str) -> None:
    from gateway.auth import Principal
    from gateway.services import decide_review

    decide_review(state=state, principal=Principal(key_id="k-reviewer", role="reviewer", team="design"),
                  job_id=job_id, decision=decision, reason="checked by a person")


def test_an_image_sent_to_review_holds_the_whole_job_signed_and_audited_but_unreleased(c2i_state, monkeypatch):
    from gateway.services import released_images

    review_second_image(c2i_state, monkeypatch)
    job_id = submit_c2i(c2i_state, class_id=1, seed=4, num_images=2)
    run_jobs(c2i_state.ctx, [job_id])
    with c2i_state.ctx.sessions() as session:
        job = session.get(Job, job_id)
    assert job.status == "review" and released_images(job) == []
    assert [image["index"] for image in job.images] == [0, 1]  # the allowed image waits with the other
    assert all(image["uri"].startswith(f"{job_id}/held/") for image in job.images)
    held = events(c2i_state, "image.held")
    assert sorted(e.id for e in held) == sorted(image["event_id"] for image in job.images)
    assert events(c2i_state, "image.released") == []
    assert policy_assertion(c2i_state.ctx.artifacts.get(job.images[1]["uri"]))["held_for_review"] is True


def park_two_images(state, monkeypatch) -> tuple[str, list[dict]]:
    """A two-image job whose second image output screening sent to review -> (job id, its held images)."""
    review_second_image(state, monkeypatch)
    job_id = submit_c2i(state, class_id=1, seed=4, num_images=2)
    run_jobs(state.ctx, [job_id])
    with state.ctx.sessions() as session:
        return job_id, session.get(Job, job_id).images


def test_approval_releases_the_held_images_without_sampling_again(c2i_state, monkeypatch) -> None:
    job_id, held = park_two_images(c2i_state, monkeypatch)
    calls = count_calls(c2i_state, monkeypatch)
    decide(c2i_state, job_id, "approve")
    assert run_jobs(c2i_state.ctx, [job_id]) == [job_id] and calls == []
    with c2i_state.ctx.sessions() as session:
        job = session.get(Job, job_id)
    assert job.status == "completed"
    assert [(i["index"], i["pixel_sha256"]) for i in job.images] == [(i["index"], i["pixel_sha256"]) for i in held]
    assert job.cost["tokens"] > 0  # the run that made the images
    released = {e.id: e for e in events(c2i_state, "image.released")}
    assert sorted(released) == sorted(image["event_id"] for image in job.images)
    verdict = policy_assertion(c2i_state.ctx.artifacts.get(job.images[1]["uri"]))
    assert verdict["review"]["decision"] == "approve" and "held_for_review" not in verdict
    for image in held:  # the held images stay: their audit events name them
        assert c2i_state.ctx.artifacts.exists(image["uri"])


def test_a_job_that_used_its_attempts_before_review_is_still_released_after_approval(c2i_state,
                                                                                     monkeypatch) -> None:
    job_id, _ = park_two_images(c2i_state, monkeypatch)
    with c2i_state.ctx.sessions() as session, session.begin():
        session.get(Job, job_id).attempts = c2i_state.ctx.max_attempts  # workers died before it was parked
    decide(c2i_state, job_id, "approve")
    assert run_jobs(c2i_state.ctx, [job_id]) == [job_id]
    with c2i_state.ctx.sessions() as session:
        assert session.get(Job, job_id).status == "completed"


def test_a_held_job_whose_model_card_changed_meanwhile_fails_instead_of_naming_the_new_card(c2i_state,
                                                                                          monkeypatch) -> None:
    job_id, _ = park_two_images(c2i_state, monkeypatch)
    with c2i_state.ctx.sessions() as session, session.begin():
        session.get(Job, job_id).model_card_hash = "sha256:" + "1" * 64  # as if the card was edited since
    decide(c2i_state, job_id, "approve")
    run_jobs(c2i_state.ctx, [job_id])
    with c2i_state.ctx.sessions() as session:
        job = session.get(Job, job_id)
    assert job.status == "failed" and "model card of tiny-c2i changed since the job was accepted" in job.error
    assert events(c2i_state, "image.released") == []


def test_failing_jobs_leaves_a_job_parked_for_review_alone(c2i_state, monkeypatch) -> None:
    from generator.pipeline import fail_jobs

    job_id, _ = park_two_images(c2i_state, monkeypatch)
    fail_jobs(c2i_state.ctx, [job_id], "stopped at the time limit")  # e.g. its task ran out of time afterwards
    with c2i_state.ctx.sessions() as session:
        job = session.get(Job, job_id)
    assert job.status == "review" and job.error is None


def test_a_held_image_changed_in_the_store_fails_the_job_instead_of_being_released(c2i_state, monkeypatch) -> None:
    job_id, held = park_two_images(c2i_state, monkeypatch)
    c2i_state.ctx.artifacts.put(held[0]["uri"], b"\x89PNG swapped")
    decide(c2i_state, job_id, "approve")
    run_jobs(c2i_state.ctx, [job_id])
    with c2i_state.ctx.sessions() as session:
        job = session.get(Job, job_id)
    assert job.status == "failed"
    assert job.error == "release after review failed: held image 0 in the store is not the one audited"
    assert events(c2i_state, "image.released") == []
    # The held images are audited evidence (image.held): failing the job removes none of them.
    assert c2i_state.ctx.artifacts.keys(job_id) == sorted(image["uri"] for image in held)


def test_a_job_interrupted_by_its_soft_time_limit_fails_saying_so(c2i_state, monkeypatch) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    def interrupted(*args):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(c2i_state.ctx.sampler, "generate", interrupted)
    job_id = submit_c2i(c2i_state, class_id=1, seed=5)
    run_jobs(c2i_state.ctx, [job_id])
    with c2i_state.ctx.sessions() as session:
        job = session.get(Job, job_id)
    assert (job.status, job.error) == ("failed", "generation failed: the job's time limit was reached")


def test_an_output_classifier_that_fails_fails_the_job_saying_so_and_releases_nothing(c2i_state, monkeypatch) -> None:
    from policies.classifiers.base import ClassifierResult
    from policies.decisions import Decision, Reason
    from policies.runtime import Screening

    runtime = c2i_state.ctx.policies.runtime()
    error = "RuntimeError: CUDA error: device-side assert triggered"

    def crashed(sets):  # what the runtime returns when the concept classifier raised: on_error blocks
        reason = Reason("nudity", "image_concepts", "nudity", None, 0.3, "block",
                        f"classifier error (fail closed): {error}")
        screening = Screening(Decision("block", (reason,), runtime.revision, stage="output"),
                              (ClassifierResult("image_concepts", "v1", {}, 1.0, error),))
        return [[screening for _ in images] for images, _ in sets]

    monkeypatch.setattr(runtime, "screen_image_sets", crashed)
    job_id = submit_c2i(c2i_state, class_id=1, seed=2)
    run_jobs(c2i_state.ctx, [job_id])
    with c2i_state.ctx.sessions() as session:
        job = session.get(Job, job_id)
    assert job.status == "failed" and job.images == []
    assert job.error == f"output screening is unavailable: classifier 'image_concepts' failed: {error}"
    assert job_id not in {e.job_id for e in events(c2i_state, "image.released")}


def test_with_the_audit_log_down_no_job_of_a_run_leaves_a_signed_image_in_the_store(c2i_state, monkeypatch) -> None:
    from pathlib import Path

    from sqlalchemy.exc import OperationalError

    ctx = c2i_state.ctx
    ids = [submit_c2i(c2i_state, class_id=i, seed=i) for i in range(3)]

    def down(work):
        raise OperationalError("COMMIT", {}, Exception("could not connect to server"))

    monkeypatch.setattr(ctx.commits, "run", down)
    with pytest.raises(RunInterrupted) as interrupted:  # failing the jobs needs the audit log too
        run_jobs(ctx, ids)
    assert sorted(interrupted.value.job_ids) == sorted(ids)
    assert list(Path(ctx.artifacts.root).glob("*/*.png")) == []


def test_a_commit_reported_failed_after_it_took_effect_keeps_the_audited_image(c2i_state, monkeypatch) -> None:
    from sqlalchemy.exc import OperationalError

    from gateway import services
    from gateway.auth import Principal

    ctx = c2i_state.ctx
    commit = ctx.commits.run
    lost: list[bool] = []

    def committed_then_lost(work):  # e.g. the connection drops while COMMIT's acknowledgement is on its way
        result = commit(work)
        if work.__qualname__.startswith("_record.") and not lost:
            lost.append(True)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
        return result

    monkeypatch.setattr(ctx.commits, "run", committed_then_lost)
    job_id = submit_c2i(c2i_state, class_id=1, seed=4)
    run_jobs(ctx, [job_id])
    with ctx.sessions() as session:
        assert session.get(Job, job_id).status == "completed"
        data = services.image_bytes(state=c2i_state, session=session, job_id=job_id, index=0,
                                    principal=Principal(key_id="a", role="auditor", team="design"))
    assert data.startswith(b"\x89PNG")


def test_what_a_queue_worker_logs_about_a_job_carries_its_request_id(c2i_state) -> None:
    import logging

    from generator.logs import ContextFilter

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("generator.pipeline")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        job_id = submit_c2i(c2i_state, class_id=1, seed=1)
        run_with_companions(c2i_state.ctx, job_id, wait_s=0.0)
        run_with_companions(c2i_state.ctx, job_id, wait_s=0.0)  # redelivered: logs that it is finished
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    (done,) = [r for r in records if "nothing to do" in r.getMessage()]
    assert (done.job_id, done.request_id) == (job_id, "test")
