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
    assert response.status_code == 422
