"""Tables: operational job state, the append-only audit evidence, and the records that evidence refers to."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from audit.db import Base, UTCDateTime

# SQLite only auto-increments INTEGER PRIMARY KEY columns; PostgreSQL gets a real BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")

APPEND_ONLY_TABLES = ("audit_events", "chain_checkpoints")


# --- mutable operational tables (owned by the gateway/pipeline) ---------------------------------------


class Job(Base):
    """A generation request and its current state."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16), index=True)
    team: Mapped[str] = mapped_column(String(128), index=True)
    key_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    model_card_hash: Mapped[str] = mapped_column(String(80))
    task: Mapped[str] = mapped_column(String(8))
    prompt: Mapped[str | None] = mapped_column(Text)
    prompt_sha256: Mapped[str | None] = mapped_column(String(64))
    prompt_commitment: Mapped[str | None] = mapped_column(String(64), index=True)
    class_id: Mapped[int | None] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    policy_revision: Mapped[str] = mapped_column(String(80))
    decisions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    images: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    cost: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    review: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    request_id: Mapped[str] = mapped_column(String(64), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class JobTransition(Base):
    """One status change of a job, with its reason."""

    __tablename__ = "job_transitions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")


class ApiKey(Base):
    """An API key: only the SHA-256 of the secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    team: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class DashboardSignout(Base):
    """A dashboard session ended by signing out, kept until the cookie would have expired anyway (session
    cookies are signed, not stored: this is what makes a copied cookie useless after sign-out)."""

    __tablename__ = "dashboard_signouts"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class PolicyRevision(Base):
    """A stored policy, keyed by its content hash; exactly one revision is active per scope."""

    __tablename__ = "policy_revisions"
    __table_args__ = (
        Index(
            "uq_policy_revisions_active_scope",
            "scope",
            unique=True,
            postgresql_where=text("active"),
            sqlite_where=text("active"),
        ),
    )

    revision: Mapped[str] = mapped_column(String(80), primary_key=True)
    policy_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    scope: Mapped[str] = mapped_column(String(128), default="org")


class ModelCardRecord(Base):
    """A model card as it was when first served, keyed by its content hash."""

    __tablename__ = "model_cards"

    content_hash: Mapped[str] = mapped_column(String(80), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[str] = mapped_column(String(64))
    card: Mapped[dict[str, Any]] = mapped_column(JSON)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PromptText(Base):
    """The erasable prompt store: the chain holds only `commitment` = sha256(salt || text)."""

    __tablename__ = "prompt_texts"

    commitment: Mapped[str] = mapped_column(String(64), primary_key=True)
    salt: Mapped[str | None] = mapped_column(String(64))
    text: Mapped[str | None] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(String(16), default="full")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ChainHead(Base):
    """The single row every append locks: the last sequence number and hash (mutable by design)."""

    __tablename__ = "chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


# --- append-only evidence (UPDATE and DELETE are rejected by triggers) --------------------------------


class AuditEvent(Base):
    """One link of the hash chain."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str] = mapped_column(String(64))
    team: Mapped[str] = mapped_column(String(128), index=True)
    job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)

    def body(self) -> dict[str, Any]:
        """The hashed part of the event (everything but the two hashes)."""
        return {
            "seq": self.seq,
            "id": self.id,
            "ts": self.ts,
            "action": self.action,
            "key_id": self.key_id,
            "team": self.team,
            "job_id": self.job_id,
            "payload": self.payload,
        }


class ChainCheckpoint(Base):
    """A signature by the organisation's key over the chain head at `seq`."""

    __tablename__ = "chain_checkpoints"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(BigInteger, index=True)
    head_hash: Mapped[str] = mapped_column(String(64))
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    alg: Mapped[str] = mapped_column(String(16))
    signature: Mapped[str] = mapped_column(Text)
    cert_pem: Mapped[str] = mapped_column(Text)
