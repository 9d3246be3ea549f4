"""audit/privacy.py: prompt storage modes and GDPR erasure that keeps the chain verifiable."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from audit.log import append_event
from audit.models import AuditEvent, Job, PromptText
from audit.privacy import PrivacyError, commit_prompt, commitment_of, erase_prompt, matches_commitment
from audit.verify import verify_database

PROMPT = "a portrait of Jane Doe, 42 Elm Street"


def record(sessions: Any, mode: Any) -> dict[str, Any]:
    with sessions() as session, session.begin():
        stored = commit_prompt(session, PROMPT, mode)
        append_event(session, action="generation.requested", key_id="k", team="ads", payload={"prompt": stored})
    return stored


def erase(sessions: Any, commitment: str, reason: str = "DSR-2026-0042") -> AuditEvent:
    with sessions() as session, session.begin():
        return erase_prompt(session, commitment, key_id="dpo-key", team="legal", reason=reason)


def test_full_mode_keeps_the_text_outside_the_chain(session_factory: Any) -> None:
    stored = record(session_factory, "full")
    with session_factory() as session:
        row = session.get(PromptText, stored["commitment"])
        event = session.scalars(select(AuditEvent)).one()
    assert row is not None and row.text == PROMPT
    assert PROMPT not in str(event.payload)


def test_commitment_is_the_salted_sha256_of_the_text(session_factory: Any) -> None:
    stored = record(session_factory, "full")
    with session_factory() as session:
        row = session.get(PromptText, stored["commitment"])
    assert row is not None and row.salt is not None
    assert commitment_of(row.salt, PROMPT) == stored["commitment"]


def test_hashed_mode_keeps_the_salt_but_not_the_text(session_factory: Any) -> None:
    stored = record(session_factory, "hashed")
    with session_factory() as session:
        row = session.get(PromptText, stored["commitment"])
        assert row is not None and row.text is None
        assert matches_commitment(session, stored["commitment"], PROMPT)
        assert not matches_commitment(session, stored["commitment"], "another prompt")


def test_redacted_mode_stores_nothing_of_the_text(session_factory: Any) -> None:
    assert record(session_factory, "redacted") == {"storage": "redacted"}
    with session_factory() as session:
        assert session.scalars(select(PromptText)).all() == []


def test_unknown_storage_mode_is_refused(session_factory: Any) -> None:
    with (
        session_factory() as session,
        pytest.raises(PrivacyError, match="unknown prompt storage mode 'plain'"),
    ):
        commit_prompt(session, PROMPT, "plain")  # type: ignore[arg-type]


def test_erasure_clears_text_and_salt(session_factory: Any) -> None:
    stored = record(session_factory, "full")
    erase(session_factory, stored["commitment"])
    with session_factory() as session:
        row = session.get(PromptText, stored["commitment"])
        assert row is not None and (row.text, row.salt) == (None, None) and row.erased_at is not None
        assert not matches_commitment(session, stored["commitment"], PROMPT)


def test_erasure_keeps_the_chain_verifiable(session_factory: Any) -> None:
    stored = record(session_factory, "full")
    erase(session_factory, stored["commitment"])
    with session_factory() as session:
        report = verify_database(session)
    assert report.ok and report.count == 2


def test_erasure_is_itself_an_audited_event(session_factory: Any) -> None:
    stored = record(session_factory, "hashed")
    event = erase(session_factory, stored["commitment"], reason="DSR-7")
    assert event.action == "prompt.erased" and event.team == "legal"
    assert event.payload["commitment"] == stored["commitment"] and event.payload["reason"] == "DSR-7"


def test_erasure_clears_the_prompt_from_jobs(session_factory: Any) -> None:
    stored = record(session_factory, "full")
    now = datetime.now(UTC)
    with session_factory() as session, session.begin():
        session.add(
            Job(
                id="job-1",
                created_at=now,
                updated_at=now,
                status="completed",
                team="ads",
                key_id="k",
                model="demo",
                model_card_hash="c" * 64,
                task="t2i",
                prompt=PROMPT,
                prompt_sha256="x" * 64,
                prompt_commitment=stored["commitment"],
                params={},
                policy_revision="r",
            )
        )
    event = erase(session_factory, stored["commitment"])
    with session_factory() as session:
        job = session.get(Job, "job-1")
    assert job is not None and job.prompt is None and job.prompt_sha256 is None
    assert event.payload["jobs_cleared"] == 1


def test_erasing_twice_is_refused(session_factory: Any) -> None:
    stored = record(session_factory, "full")
    erase(session_factory, stored["commitment"])
    with pytest.raises(PrivacyError, match="already erased"):
        erase(session_factory, stored["commitment"])


def test_erasing_an_unknown_commitment_is_refused(session_factory: Any) -> None:
    with pytest.raises(PrivacyError, match="no stored prompt has the commitment"):
        erase(session_factory, "0" * 64)


def test_erasure_requires_a_reason(session_factory: Any) -> None:
    stored = record(session_factory, "full")
    with pytest.raises(PrivacyError, match="needs a reason"):
        erase(session_factory, stored["commitment"], reason=" ")
