"""The only writer of the audit chain: `append_event`, serialised on the chain head row."""

from __future__ import annotations

import hashlib
import json
import uuid
import weakref
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from audit.chain import body_bytes, canonical_json, format_ts
from audit.models import AuditEvent, ChainHead

HEAD_ROW_ID = 1
_HEAD_KEY = "audit.locked_chain_head"


class AuditLogError(Exception):
    """The audit log cannot accept an event (missing chain head, bad payload)."""


def lock_chain_head(session: Session) -> ChainHead:
    """Lock the chain head for the rest of the caller's transaction and return it.

    PostgreSQL: SELECT ... FOR UPDATE on the single head row. SQLite has no row locks: a no-op UPDATE of
    the head row first takes the database write lock (pysqlite begins the transaction before DML), so the
    read that follows cannot race another writer. Once locked, later appends in the same transaction reuse
    the head without a round trip, so their inserts are flushed together at commit.
    """
    held = session.info.get(_HEAD_KEY)
    if held is not None and session.get_nested_transaction() is None:
        transaction_ref, locked = held
        root = session.get_transaction()
        if root is not None and transaction_ref() is root and root.is_active and locked in session:
            return cast(ChainHead, locked)
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(ChainHead).where(ChainHead.id == HEAD_ROW_ID).values(seq=ChainHead.seq))
    query = select(ChainHead).where(ChainHead.id == HEAD_ROW_ID).with_for_update()
    head = session.scalars(query.execution_options(populate_existing=True)).one_or_none()
    if head is None:
        raise AuditLogError("the chain_head row is missing: run `llamagen-gateway migrate` on this database")
    root = session.get_transaction()
    if root is not None and session.get_nested_transaction() is None:
        # A lock taken inside a savepoint is released if the savepoint rolls back: only remember root locks.
        session.info[_HEAD_KEY] = (weakref.ref(root), head)
    else:
        session.info.pop(_HEAD_KEY, None)
    return head


def append_event(
    session: Session,
    *,
    action: str,
    key_id: str,
    team: str,
    job_id: str | None = None,
    payload: Mapping[str, Any],
    event_id: str | None = None,
) -> AuditEvent:
    """Append one event to the chain inside the caller's transaction (the caller commits).

    The head stays locked until that commit, so concurrent writers queue instead of forking the chain.
    The payload is stored exactly as it is hashed (canonical JSON round trip). The event is pending in the
    session: it is inserted at the next flush (any query, or the commit), together with its neighbours.
    """
    if not action:
        raise AuditLogError("an audit event needs an action")
    payload_json = canonical_json(dict(payload))
    head = lock_chain_head(session)
    event = AuditEvent(
        seq=head.seq + 1,
        id=event_id or str(uuid.uuid4()),
        # Microsecond precision is what every backend stores; the hash covers exactly that.
        ts=datetime.now(UTC),
        action=action,
        key_id=key_id,
        team=team,
        job_id=job_id,
        payload=json.loads(payload_json),  # stored (canonically) as exactly the text hashed below
        prev_hash=head.hash,
    )
    body = body_bytes(seq=event.seq, id=event.id, ts=format_ts(event.ts), action=action, key_id=key_id,
                      team=team, job_id=job_id, payload_json=payload_json)
    event.hash = hashlib.sha256(head.hash.encode("ascii") + b"\n" + body).hexdigest()
    session.add(event)
    head.seq = event.seq
    head.hash = event.hash
    return event
