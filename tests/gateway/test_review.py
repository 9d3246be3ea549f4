"""Human review: a `review` decision parks the job; reviewers approve or reject it with a reason."""

from __future__ import annotations

import pytest

from tests.conftest import LEXICAL_POLICY


@pytest.fixture
def gw(gateway_factory, tiny_models):
    return gateway_factory(models_dir=tiny_models, default_model="tiny-t2i",
                           policy_file=LEXICAL_POLICY)


def park(gw, key: str) -> str:
    response = gw.client.post("/v1/generations", headers=gw.auth(key),
                              json={"prompt": "a celebrity waving", "params": {"seed": 3}})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "review"
    return str(response.json()["id"])


def actions(gw, job_id: str) -> list[str]:
    events = gw.client.get("/v1/audit/events", params={"job_id": job_id},
                           headers=gw.auth(gw.key("auditor"))).json()["data"]
    return [e["action"] for e in reversed(events)]


def test_review_decision_parks_the_job_and_lists_it_for_reviewers(gw) -> None:
    job_id = park(gw, gw.key("creator"))
    queue = gw.client.get("/v1/review", headers=gw.auth(gw.key("reviewer"))).json()
    assert job_id in [item["id"] for item in queue["data"]]
    item = next(i for i in queue["data"] if i["id"] == job_id)
    reasons = item["decisions"]["prompt"]["screenings"][0]["decision"]["reasons"]
    assert reasons[0]["rule_id"] == "needs_a_human"
    assert "generation.review" in actions(gw, job_id)


def test_approval_resumes_generation_and_is_audited(gw) -> None:
    creator = gw.key("creator")
    job_id = park(gw, creator)
    decided = gw.client.post(f"/v1/review/{job_id}", headers=gw.auth(gw.key("reviewer")),
                             json={"decision": "approve", "reason": "public event photo, fine"})
    assert decided.status_code == 200, decided.text
    job = gw.wait(job_id, creator)
    assert job["status"] == "completed" and job["review"]["decision"] == "approve"
    trail = actions(gw, job_id)
    assert trail.index("review.decided") < trail.index("image.released")


def test_rejection_ends_the_job(gw) -> None:
    job_id = park(gw, gw.key("creator"))
    gw.client.post(f"/v1/review/{job_id}", headers=gw.auth(gw.key("reviewer")),
                   json={"decision": "reject", "reason": "no consent from the person"})
    job = gw.client.get(f"/v1/generations/{job_id}", headers=gw.auth(gw.key("auditor"))).json()
    assert job["status"] == "blocked" and "no consent" in job["error"] and not job["images"]
    assert "review.decided" in actions(gw, job_id)


def test_a_requester_cannot_approve_its_own_job(gw) -> None:
    admin = gw.key("admin")
    job_id = park(gw, admin)
    response = gw.client.post(f"/v1/review/{job_id}", headers=gw.auth(admin),
                              json={"decision": "approve", "reason": "trust me"})
    assert response.status_code == 403


def test_a_decision_needs_a_reason(gw) -> None:
    job_id = park(gw, gw.key("creator"))
    response = gw.client.post(f"/v1/review/{job_id}", headers=gw.auth(gw.key("reviewer")),
                              json={"decision": "approve", "reason": ""})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_a_job_not_waiting_for_review_cannot_be_decided(gw) -> None:
    creator = gw.key("creator")
    done = gw.client.post("/v1/generations", headers=gw.auth(creator), json={"prompt": "a red star"}).json()
    gw.wait(done["id"], creator)
    response = gw.client.post(f"/v1/review/{done['id']}", headers=gw.auth(gw.key("reviewer")),
                              json={"decision": "approve", "reason": "late approval"})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "conflict" and error["message"].endswith("is completed, not waiting for review")


def test_two_reviewers_deciding_at_once_commit_one_decision(c2i_state, monkeypatch) -> None:
    import threading
    import time

    from sqlalchemy import select

    from audit.models import AuditEvent, Job
    from gateway import services
    from gateway.auth import Principal
    from gateway.errors import Conflict
    from gateway.schemas import GenerationCreate

    state = c2i_state
    job = services.submit_generation(state=state, principal=Principal(key_id="k-creator", role="creator",
                                                                      team="design"),
                                     request=GenerationCreate.model_validate({"model": "tiny-c2i", "class_id": 1}),
                                     request_id="r")
    with state.ctx.sessions() as session, session.begin():
        session.get(Job, job.id).status = "review"
    transition = services.transition
    # The first reviewer holds its transaction open a while, so the second decides while it is in progress.
    monkeypatch.setattr(services, "transition", lambda *args: (time.sleep(0.3), transition(*args))[1])
    outcomes: dict[str, str] = {}

    def decide(reviewer: str, decision: str) -> None:
        try:
            services.decide_review(state=state, principal=Principal(key_id=reviewer, role="reviewer", team="t"),
                                   job_id=job.id, decision=decision, reason=f"{reviewer}: {decision}")
            outcomes[reviewer] = decision
        except Conflict:
            outcomes[reviewer] = "refused"

    threads = [threading.Thread(target=decide, args=("rev-a", "approve")),
               threading.Thread(target=decide, args=("rev-b", "reject"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes.values()).count("refused") == 1
    with state.ctx.sessions() as session:
        decided = session.scalars(select(AuditEvent).where(AuditEvent.job_id == job.id,
                                                           AuditEvent.action == "review.decided")).all()
        final = session.get(Job, job.id)
    assert len(decided) == 1
    assert final.status == ("queued" if decided[0].payload["decision"] == "approve" else "blocked")


def test_a_reviewer_sees_the_images_output_screening_held_and_approval_releases_exactly_those(
        gateway_factory, tiny_models, monkeypatch) -> None:
    import hashlib
    import io

    from PIL import Image

    from policies.classifiers.base import ClassifierResult
    from policies.decisions import Decision, Reason
    from policies.runtime import Screening

    gw = gateway_factory(models_dir=tiny_models, default_model="tiny-c2i", policy_file=LEXICAL_POLICY)
    runtime = gw.state.ctx.policies.runtime()

    def second_image_to_review(sets):
        reason = Reason("look_closer", "image_concepts", "logo", 0.4, 0.3, "review", "a human decides")
        return [[Screening(Decision("review" if i else "allow", (reason,) if i else (), runtime.revision,
                                    stage="output"), (ClassifierResult("image_concepts", "v1", {"logo": 0.4}, 1.0),))
                 for i in range(len(images))] for images, _ in sets]

    monkeypatch.setattr(runtime, "screen_image_sets", second_image_to_review)
    creator, reviewer = gw.key("creator"), gw.key("reviewer")
    job_id = gw.client.post("/v1/generations", headers=gw.auth(creator),
                            json={"class_id": 1, "params": {"seed": 2, "num_images": 2}}).json()["id"]
    parked = gw.wait(job_id, creator)
    assert parked["status"] == "review" and parked["images"] == []  # the requester sees nothing yet
    assert gw.client.get(f"/v1/review/{job_id}/images/0", headers=gw.auth(creator)).status_code == 403

    (item,) = [i for i in gw.client.get("/v1/review", headers=gw.auth(reviewer)).json()["data"] if i["id"] == job_id]
    assert [image["index"] for image in item["held_images"]] == [0, 1]
    held = []
    for image in item["held_images"]:
        response = gw.client.get(image["url"], headers=gw.auth(reviewer))
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert hashlib.sha256(response.content).hexdigest() == image["sha256"]
        held.append(Image.open(io.BytesIO(response.content)).convert("RGB").tobytes())

    decided = gw.client.post(f"/v1/review/{job_id}", headers=gw.auth(reviewer),
                             json={"decision": "approve", "reason": "the logo is our own"})
    assert decided.status_code == 200, decided.text
    done = gw.wait(job_id, creator)
    assert done["status"] == "completed" and [image["index"] for image in done["images"]] == [0, 1]
    released = [Image.open(io.BytesIO(gw.client.get(image["url"], headers=gw.auth(creator)).content))
                .convert("RGB").tobytes() for image in done["images"]]
    assert released == held  # the very pixels the reviewer saw
    assert gw.client.get(item["held_images"][0]["url"], headers=gw.auth(reviewer)).status_code == 404
    trail = actions(gw, job_id)
    assert trail.count("image.held") == 2 and trail.count("image.released") == 2
    assert trail.index("image.held") < trail.index("review.decided") < trail.index("image.released")
