"""Prompt storage as the policy says (full, hashed, redacted) and GDPR erasure that keeps the chain intact.

The chain never holds prompt text. It holds a salted commitment, sha256(salt || text) with a random
16-byte salt, so the text can be erased later while every event still verifies:
* full: the text and salt are kept in `prompt_texts` (readable by auditors until erased);
* hashed: only the salt is kept, so a candidate prompt can be checked against the commitment, not read;
* redacted: no commitment and nothing stored: the event records only that a prompt was redacted.
Erasure clears text and salt (the commitment can no longer be linked to any text) and is itself audited.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime
from typing import Any, Literal, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session

from audit.log import ChainedEvent, append_event
from audit.models import Job, PromptText

PromptStorage = Literal["full", "hashed", "redacted"]
STORAGE_MODES: tuple[PromptStorage, ...] = ("full", "hashed", "redacted")


class PrivacyError(Exception):
    """A prompt cannot be stored or erased as asked (unknown mode or commitment, already erased)."""


def commitment_of(salt_hex: str, text: str) -> str:
    """sha256(salt bytes || UTF-8 text), hex: the value the chain carries."""
    return hashlib.sha256(bytes.fromhex(salt_hex) + text.encode("utf-8")).hexdigest()


def commit_prompt(session: Session, text: str, mode: PromptStorage) -> dict[str, Any]:
    """Store the prompt as `mode` says and return what the audit event payload should carry."""
    if mode not in STORAGE_MODES:
        raise PrivacyError(f"unknown prompt storage mode {mode!r}: use one of {', '.join(STORAGE_MODES)}")
    if mode == "redacted":
        return {"storage": "redacted"}
    salt = secrets.token_hex(16)
    commitment = commitment_of(salt, text)
    session.add(
        PromptText(
            commitment=commitment,
            salt=salt,
            text=text if mode == "full" else None,
            mode=mode,
            created_at=datetime.now(UTC),
        )
    )
    session.flush()
    return {"storage": mode, "commitment": commitment}


def matches_commitment(session: Session, commitment: str, candidate: str) -> bool:
    """Whether `candidate` is the prompt behind `commitment` (False once erased)."""
    row = session.get(PromptText, commitment)
    if row is None or row.salt is None:
        return False
    return hmac.compare_digest(commitment_of(row.salt, candidate), commitment)


def erase_prompt(session: Session, commitment: str, *, key_id: str, team: str, reason: str) -> ChainedEvent:
    """Erase a prompt's text and salt, clear it from jobs, and append a `prompt.erased` event."""
    if not reason.strip():
        raise PrivacyError("an erasure needs a reason (e.g. the data subject request reference)")
    row = session.get(PromptText, commitment, with_for_update=True)
    if row is None:
        raise PrivacyError(f"no stored prompt has the commitment {commitment}")
    if row.erased_at is not None:
        raise PrivacyError(f"the prompt {commitment} was already erased at {row.erased_at.isoformat()}")
    row.text = None
    row.salt = None
    row.erased_at = datetime.now(UTC)
    cleared = cast(
        CursorResult[Any],
        session.execute(update(Job).where(Job.prompt_commitment == commitment).values(prompt=None, prompt_sha256=None)),
    )
    return append_event(
        session,
        action="prompt.erased",
        key_id=key_id,
        team=team,
        payload={"commitment": commitment, "reason": reason, "mode": row.mode,
                 "jobs_cleared": cleared.rowcount},
    )
