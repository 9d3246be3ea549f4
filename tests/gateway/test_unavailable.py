"""Faults of the gateway's dependencies after a caller is authenticated: a 503 with the error body, never a 500
(design.md: a required classifier, the database or the store being down stops the request and says why)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from audit.models import Job
from tests.conftest import LEXICAL_POLICY
from tests.factories import RecordingDispatcher


@pytest.fixture
def gw(gateway_factory, tiny_models):
    return gateway_factory(models_dir=tiny_models, default_model="tiny-c2i", policy_file=LEXICAL_POLICY)


def stored(gw, job_id: str) -> Path:
    (path,) = (Path(gw.state.ctx.artifacts.root) / job_id).glob("0-*.png")  # <job>/<index>-<event id>.png
    return path


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


@pytest.fixture
def broken_lexical(monkeypatch: pytest.MonkeyPatch) -> None:
    from policies.classifiers.lexical import LexicalClassifier

    def crash(self, inputs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(LexicalClassifier, "score", crash)


def test_a_prompt_classifier_that_crashes_gives_503_naming_it_and_queues_nothing(gw, broken_lexical) -> None:
    key = gw.auth(gw.key("creator"))
    response = gw.client.post("/v1/generations", headers=key, json={"model": "tiny-c2i", "class_id": 1})
    assert response.status_code == 503, response.text
    error = error_of(response)
    assert error["code"] == "service_unavailable" and "classifier 'lexical' failed" in error["message"]
    with gw.state.ctx.sessions() as session:
        assert session.scalars(select(Job)).all() == []


def test_moderation_with_a_crashed_classifier_gives_503_not_a_block(gw, broken_lexical) -> None:
    response = gw.client.post("/v1/moderations", headers=gw.auth(gw.key("creator")),
                              json={"model": "tiny-c2i", "prompt": "a cat"})
    assert response.status_code == 503 and "classifier 'lexical' failed" in error_of(response)["message"]


@pytest.mark.parametrize(("path", "body"), [("/v1/generations", {"model": "tiny-c2i", "class_id": 1}),
                                            ("/v1/moderations", {"model": "tiny-c2i", "prompt": "a red cat"})])
def test_a_request_refused_because_screening_crashed_is_audited_with_the_reason(gw, broken_lexical, path: str,
                                                                               body: dict) -> None:
    creator = gw.key("creator")
    response = gw.client.post(path, headers=gw.auth(creator), json=body)
    assert response.status_code == 503
    auditor = gw.auth(gw.key("auditor"))
    (event,) = gw.client.get("/v1/audit/events", params={"action": "prompt.unscreened"}, headers=auditor).json()["data"]
    assert event["team"] == "design" and event["key_id"] and creator not in str(event)  # the key's id, not the key
    payload = event["payload"]
    assert payload["request_id"] == response.headers["x-request-id"] and payload["model"] == "tiny-c2i"
    assert "classifier 'lexical' failed" in payload["reason"]
    assert "prompt" not in payload and len(payload["prompt_sha256"]) == 64  # the text itself is not stored
    assert gw.client.get("/v1/audit/verify", headers=auditor).json()["ok"]


def test_an_image_the_artifact_store_cannot_return_gives_503(gw) -> None:
    key = gw.key("creator")
    job = gw.client.post("/v1/generations", headers=gw.auth(key), json={"model": "tiny-c2i", "class_id": 1}).json()
    assert gw.wait(job["id"], key)["status"] == "completed"
    stored(gw, job["id"]).unlink()  # the store lost it, or is unreachable
    response = gw.client.get(f"/v1/generations/{job['id']}/images/0", headers=gw.auth(key))
    assert response.status_code == 503 and "artifact store" in error_of(response)["message"]


def test_a_database_that_goes_down_during_a_long_poll_gives_503_without_its_driver_text(gw) -> None:
    gw.state.dispatcher = RecordingDispatcher()  # the job stays queued, so the poll waits
    key = gw.auth(gw.key("creator"))
    job = gw.client.post("/v1/generations", headers=key, json={"model": "tiny-c2i", "class_id": 1}).json()
    down = threading.Event()

    def refuse(*args: object) -> None:
        if down.is_set():
            raise OperationalError("SELECT", {}, Exception("could not connect to db.internal:5432"))

    event.listen(gw.state.ctx.sessions.kw["bind"], "before_cursor_execute", refuse)
    threading.Timer(0.3, down.set).start()
    response = gw.client.get(f"/v1/generations/{job['id']}?wait=5", headers=key)  # authenticated before
    down.clear()
    assert response.status_code == 503, response.text
    error = error_of(response)
    assert error["message"] == "the database is unavailable; see the gateway log" and "5432" not in response.text


def test_a_stored_image_that_differs_from_its_audit_record_is_withheld(gw) -> None:
    key = gw.key("creator")
    job = gw.client.post("/v1/generations", headers=gw.auth(key), json={"model": "tiny-c2i", "class_id": 1}).json()
    assert gw.wait(job["id"], key)["status"] == "completed"
    stored(gw, job["id"]).write_bytes(b"\x89PNG\r\n\x1a\nnot the audited image")
    response = gw.client.get(f"/v1/generations/{job['id']}/images/0", headers=gw.auth(key))
    assert response.status_code == 503 and "does not match its audit record" in error_of(response)["message"]


def test_images_of_a_job_that_did_not_complete_are_neither_listed_nor_served(gw) -> None:
    key = gw.key("creator")
    job = gw.client.post("/v1/generations", headers=gw.auth(key), json={"model": "tiny-c2i", "class_id": 1}).json()
    assert gw.wait(job["id"], key)["status"] == "completed"
    with gw.state.ctx.sessions() as session, session.begin():  # e.g. a late rejection that raced the release
        session.get(Job, job["id"]).status = "blocked"
    assert gw.client.get(f"/v1/generations/{job['id']}", headers=gw.auth(key)).json()["images"] == []
    assert gw.client.get(f"/v1/generations/{job['id']}/images/0", headers=gw.auth(key)).status_code == 404


def _database_goes_down_after_auth(gw, after_statements: int = 0) -> threading.Event:
    """From the next request on, every statement past the caller's key lookup (and `after_statements` more)
    fails as a lost connection would."""
    down = threading.Event()
    seen = [0]

    def refuse(conn, cursor, statement: str, *args: object) -> None:
        if not down.is_set() or "api_keys" in statement:
            return
        seen[0] += 1
        if seen[0] > after_statements:
            raise OperationalError(statement, {}, Exception("could not connect to db.internal:5432"))

    event.listen(gw.state.ctx.sessions.kw["bind"], "before_cursor_execute", refuse)
    down.set()
    return down


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_export_the_database_cannot_start_gives_503_not_an_empty_stream(gw, fmt: str) -> None:
    key = gw.auth(gw.key("auditor"))
    down = _database_goes_down_after_auth(gw)
    response = gw.client.get(f"/v1/audit/export?format={fmt}", headers=key)
    down.clear()
    assert response.status_code == 503, response.text
    assert error_of(response)["message"] == "the database is unavailable; see the gateway log"
    assert "5432" not in response.text


def test_an_export_the_database_fails_midway_ends_in_an_error_line_and_a_failed_transfer(
        gw, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import audit.export
    from audit.verify import ExportFileError, verify_export
    from gateway import services
    from gateway.auth import Principal

    gw.state.dispatcher = RecordingDispatcher()  # the jobs stay queued: no worker touches the database
    for class_id in range(3):  # a few jobs: their events to export
        gw.client.post("/v1/generations", headers=gw.auth(gw.key("creator")), json={"model": "tiny-c2i",
                                                                                 "class_id": class_id})
    monkeypatch.setattr(audit.export, "BATCH", 1)  # a chunk per line, so the stream has begun when it fails
    down = _database_goes_down_after_auth(gw, after_statements=1)  # the check passes, the checkpoints fail
    chunks: list[str] = []
    with pytest.raises(services.ExportCutShort):
        for chunk in services.export_events(state=gw.state, principal=Principal("k", "auditor", "org"),
                                            fmt="jsonl", action=None, team=None, since=None, until=None):
            chunks.append(chunk)
    down.clear()
    assert len(chunks) == 2 and chunks[-1] == audit.export.cut_short_line(
        "the server could not read the rest of the audit log; see the gateway log")
    assert "5432" not in "".join(chunks)
    path = tmp_path / "cut.jsonl"
    path.write_text("".join(chunks))
    with pytest.raises(ExportFileError, match="the export was cut short"):
        verify_export(path)


def test_a_request_whose_audit_commit_took_effect_before_it_was_reported_failed_is_queued_once(
        gw, monkeypatch: pytest.MonkeyPatch) -> None:
    gw.state.dispatcher = dispatcher = RecordingDispatcher()
    commit = gw.state.ctx.commits.run

    def committed_then_lost(work):  # the connection drops while COMMIT's acknowledgement is on its way
        commit(work)
        raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(gw.state.ctx.commits, "run", committed_then_lost)
    response = gw.client.post("/v1/generations", headers=gw.auth(gw.key("creator")),
                              json={"model": "tiny-c2i", "class_id": 1})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert dispatcher.sent == [job_id]
    with gw.state.ctx.sessions() as session:
        assert session.scalars(select(Job.id)).all() == [job_id]


def test_a_request_whose_audit_commit_cannot_be_confirmed_gives_503_with_the_job_id_to_poll(
        gw, monkeypatch: pytest.MonkeyPatch) -> None:
    gw.state.dispatcher = dispatcher = RecordingDispatcher()
    key = gw.auth(gw.key("creator"))
    commit = gw.state.ctx.commits.run

    downs: list[threading.Event] = []

    def committed_then_database_gone(work):
        commit(work)
        downs.append(_database_goes_down_after_auth(gw))
        raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(gw.state.ctx.commits, "run", committed_then_database_gone)
    response = gw.client.post("/v1/generations", headers=key, json={"model": "tiny-c2i", "class_id": 1})
    downs[0].clear()
    assert response.status_code == 503, response.text
    error = error_of(response)
    job_id = error["details"]["id"]
    assert f"may have been recorded as job {job_id}: poll it" in error["message"] and dispatcher.sent == []
    assert gw.client.get(f"/v1/generations/{job_id}", headers=key).json()["status"] == "queued"  # it was


def test_a_database_locked_by_another_writer_gives_503_busy_with_retry_after(gw) -> None:
    key = gw.auth(gw.key("creator"))
    listener = _locked
    event.listen(gw.state.ctx.sessions.kw["bind"], "before_cursor_execute", listener)
    try:
        response = gw.client.post("/v1/generations", headers=key, json={"model": "tiny-c2i", "class_id": 1})
    finally:
        event.remove(gw.state.ctx.sessions.kw["bind"], "before_cursor_execute", listener)
    assert response.status_code == 503, response.text
    assert error_of(response)["message"] == ("nothing was generated: the audit log could not record the request "
                                             "(the database is busy; retry shortly)")
    assert response.headers["Retry-After"] == "1" and "INSERT" not in response.text
    with gw.state.ctx.sessions() as session:
        assert session.scalars(select(Job.id)).all() == []


def _locked(conn, cursor, statement: str, *args: object) -> None:
    import sqlite3

    if "api_keys" not in statement and statement.lstrip().upper().startswith("INSERT"):
        raise OperationalError(statement, {}, sqlite3.OperationalError("database is locked"))


def job_count(gw) -> int:
    from sqlalchemy import func

    with gw.state.ctx.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def test_a_signer_that_cannot_sign_gives_503_before_anything_is_screened_or_generated(gw, monkeypatch) -> None:
    creator = gw.key("creator")

    def broken(*args, **kwargs):
        raise RuntimeError("PKCS#11 token removed from /dev/hsm0")

    monkeypatch.setattr(gw.state.ctx.signer, "sign_png", broken)
    response = gw.client.post("/v1/generations", headers=gw.auth(creator), json={"class_id": 1})
    assert response.status_code == 503
    message = error_of(response)["message"]
    assert message.startswith("the signer is unavailable (RuntimeError") and "/dev/hsm0" not in message
    assert job_count(gw) == 0
    assert not gw.client.get("/readyz").json()["checks"]["signer"]["ok"]
    monkeypatch.undo()  # the signer is back: the next request is accepted and released
    accepted = gw.client.post("/v1/generations", headers=gw.auth(creator), json={"class_id": 1})
    assert accepted.status_code == 202
    assert gw.wait(accepted.json()["id"], creator)["status"] == "completed"


def test_an_image_classifier_without_its_weights_gives_503_before_anything_is_generated(gateway_factory,
                                                                                        tiny_models, tmp_path):
    policy = tmp_path / "with-images.yaml"
    policy.write_text(LEXICAL_POLICY.read_text() + """output:
  image_concepts:
    model: {architecture: clip_config, config: missing/clip_config.json, weights: missing/clip.pt}
    concepts:
      - {id: image_gore, name: gore, action: block, threshold: 0.2, prompts: [graphic gore]}
""")
    gw = gateway_factory(models_dir=tiny_models, default_model="tiny-c2i", policy_file=policy)
    creator = gw.key("creator")
    first = gw.client.post("/v1/generations", headers=gw.auth(creator), json={"class_id": 1})
    # Nothing had loaded the image classifier: the first job finds out after sampling, fails and releases nothing.
    job = gw.wait(first.json()["id"], creator)
    assert job["status"] == "failed" and job["error"].startswith("output screening is unavailable")
    refused = gw.client.post("/v1/generations", headers=gw.auth(creator), json={"class_id": 2})
    assert refused.status_code == 503
    assert error_of(refused)["message"].startswith("output screening is unavailable: classifier 'image_concepts'")
    assert job_count(gw) == 1  # the refused request queued nothing
    ready = gw.client.get("/readyz").json()["checks"]["policy"]
    assert not ready["ok"] and "output screening is unavailable" in ready["error"]
    moderated = gw.client.post("/v1/moderations", headers=gw.auth(creator), json={"prompt": "a red star"})
    assert moderated.status_code == 200  # screening a prompt only needs the prompt classifiers
